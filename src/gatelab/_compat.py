"""Old import paths of the lab (``gatelab.train``, ``gatelab.models.lm``, ...), kept for one release.

Before 0.2 the lab's modules sat at the top of the package. Importing an old name warns once and hands
back the module at its new home (the same object, so classes and registries are not duplicated).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

# old prefix -> new prefix; a sub-module follows its package (gatelab.models.lm -> gatelab.lab.models.lm)
MOVED = {
    "gatelab.train": "gatelab.lab.train",
    "gatelab.report": "gatelab.lab.report",
    "gatelab.report_plots": "gatelab.lab.plots",
    "gatelab.presets": "gatelab.lab.presets",
    "gatelab.compare_kv": "gatelab.lab.kv.rows",
    "gatelab.cache.evaluate": "gatelab.lab.kv.evaluate",
    "gatelab.models": "gatelab.lab.models",
    "gatelab.tasks": "gatelab.lab.tasks",
    "gatelab.diagnostics": "gatelab.lab.diagnostics",
}


def new_name(fullname: str) -> str | None:
    """The module's new home, or None if ``fullname`` did not move."""
    for old, new in MOVED.items():
        if fullname == old or fullname.startswith(old + "."):
            return new + fullname[len(old) :]
    return None


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if new_name(fullname) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None  # a plain stub; exec_module swaps it for the real module

    def exec_module(self, module):
        old = module.__name__
        new = new_name(old)
        warnings.warn(
            f"{old} moved to {new}; the old path will be removed in gatelab 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        # the import system returns whatever sys.modules holds under the name after exec_module
        sys.modules[old] = importlib.import_module(new)


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
