"""Deployment files: save, load (strictly validated JSON) and show a plan made for a model and job."""

from .deployment import Deployment, load_deployment, save_deployment
from .show import show_deployment

__all__ = ["Deployment", "load_deployment", "save_deployment", "show_deployment"]
