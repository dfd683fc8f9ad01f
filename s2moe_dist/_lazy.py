"""PEP 562 lazy exports: a package's public names are imported on first access, so importing the
package (e.g. for the console scripts' signal handlers) does not import torch."""
import importlib
import sys
from typing import Callable, Mapping


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` resolving ``names`` ({attribute: relative module}) of ``package``."""
    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name], package), name)
        setattr(sys.modules[package], name, value)
        return value
    return __getattr__
