"""Functional ops: tensors in, tensors out, no parameters. ``gatelab.ops.<key>(...)`` for every op.

Each sub-package ``ops/<key>/`` exports a function named ``<key>``; they are collected here
automatically, so a new op needs no edit to this file.
"""

from __future__ import annotations

import importlib
import pkgutil

__all__: list[str] = []

for _info in pkgutil.iter_modules(__path__):
    if _info.ispkg and _info.name != "common":
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        if hasattr(_module, _info.name):
            globals()[_info.name] = getattr(_module, _info.name)
            __all__.append(_info.name)
