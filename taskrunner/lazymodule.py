"""A module imported on first use: start-up of `taskrun` loads only what its command needs.

`lazy("git")` returns a stand-in whose first attribute access imports the
module (importlib, once; later accesses are a sys.modules lookup) and returns
that attribute. An ImportError surfaces at that first use, not at import of
the module holding the stand-in.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stand-in for the module `name`: attributes are read from it, imported on first access."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{' (loaded)' if self._module is not None else ''}>"


def lazy(name: str) -> Any:
    """A LazyModule for `name`, typed Any so attribute uses type-check as they would on the module."""
    return LazyModule(name)
