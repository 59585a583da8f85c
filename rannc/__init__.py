"""rannc: automatic hybrid pipeline + data parallel training for unmodified PyTorch models."""
