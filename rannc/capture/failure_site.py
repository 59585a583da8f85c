"""Where in the user's code torch.export failed, and how to mark that code opaque (`rannc.opaque`)."""

from __future__ import annotations

import dataclasses
import linecache
import re
import sysconfig
import traceback
from pathlib import Path

import torch

# Code that is not the user's: torch, rannc and the standard library. Model libraries (transformers, ...) count as
# the user's: their modules can be marked opaque like any other.
_LIBRARY_DIRS = tuple(
    str(Path(p).resolve())
    for p in (Path(torch.__file__).parent, Path(__file__).parent.parent, sysconfig.get_paths()["stdlib"])
)


@dataclasses.dataclass(frozen=True)
class FailureSite:
    """The innermost user frame on an export failure's traceback."""

    function: str  # qualified name of the function (or method) that failed
    filename: str
    lineno: int
    line: str
    module_name: str | None  # qualified name in the model when the code is a method of one of its submodules
    module_class: str | None
    scripted: bool  # the function is a torch.jit.script function (export ran its Python source)

    def where(self) -> str:
        return f"{self.function} ({self.filename}:{self.lineno}: `{self.line}`)"

    def remedy(self) -> str:
        if self.module_name == "":
            return (
                "the failing code is in the model's own forward(): move it into a function and decorate that with "
                "@rannc.opaque, so that rannc captures each call as one operation without tracing into it"
            )
        if self.module_name is not None:
            return (
                f"mark the submodule {self.module_name} ({self.module_class}) opaque, so that rannc captures it as "
                f"one operation without tracing into it: set the config item opaque_modules = "
                f'["{self.module_name}"], call rannc.opaque(model.{self.module_name}) before wrapping, or decorate '
                f"class {self.module_class} with @rannc.opaque"
            )
        above = " (above @torch.jit.script)" if self.scripted else ""
        return (
            f"mark {self.function} opaque, so that rannc captures each call as one operation without tracing into "
            f"it: decorate it with @rannc.opaque{above}"
        )


def failure_site(exc: BaseException, model: torch.nn.Module) -> FailureSite | None:
    """The user code an export failure happened in, or None when no user frame is on its traceback."""
    modules = {id(module): name for name, module in model.named_modules()}
    for frame, lineno in reversed(list(traceback.walk_tb(exc.__traceback__))):
        code = frame.f_code
        if _is_library(code.co_filename):
            continue
        owner = frame.f_locals.get("self")
        module_name = modules.get(id(owner)) if isinstance(owner, torch.nn.Module) else None
        return FailureSite(
            function=re.sub(r"(\.<locals>\.<(listcomp|genexpr|dictcomp|setcomp)>)+$", "", code.co_qualname),
            filename=code.co_filename,
            lineno=lineno,
            line=linecache.getline(code.co_filename, lineno).strip(),
            module_name=module_name,
            module_class=type(owner).__name__ if module_name is not None else None,
            scripted=isinstance(frame.f_globals.get(code.co_name), torch.jit.ScriptFunction),
        )
    return None


def _is_library(filename: str) -> bool:
    if filename.startswith("<"):  # exec'd code: torch.export's generated wrappers
        return True
    return str(Path(filename).resolve()).startswith(_LIBRARY_DIRS)


def is_data_dependent(exc: BaseException) -> bool:
    """Whether an export failure is data-dependent control flow (a branch, loop or int() on tensor values)."""
    text = f"{type(exc).__name__}: {exc}"
    return any(word in text for word in ("DataDependent", "data-dependent", "data dependent"))


def explain(exc: BaseException, model: torch.nn.Module) -> str:
    """The sentences of a CaptureError that name where capture failed and, for code that cannot be traced, the
    remedy (empty when no user frame is on the traceback)."""
    site = failure_site(exc, model)
    if site is None:
        return ""
    if is_data_dependent(exc):
        return (
            f"Capture failed in {site.where()}: Python control flow that depends on tensor values (an if, a loop "
            f"or int()/.item()/.tolist() on data), which torch.export cannot capture. To train it as it is, "
            f"{site.remedy()}."
        )
    return f"Capture failed in {site.where()}. If that code cannot be made capturable, {site.remedy()}."
