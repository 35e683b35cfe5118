"""Functional ops: tensors in, tensors out, no parameters. ``gatelab.ops.<key>(...)`` for every op.

Each sub-package ``ops/<key>/`` exports a function named ``<key>``; they are collected here
automatically, so a new op needs no edit to this file. ``gatelab.ops.<key>`` stays the package (so
``import gatelab.ops.gla as m`` and ``ops.gla.reference`` reach its modules) and calling it calls the
function: ``ops.gla(q, k, v, g)`` is ``gatelab.ops.gla.gla(q, k, v, g)``.
"""

from __future__ import annotations

import importlib
import pkgutil
import types

__all__: list[str] = []


class OpPackage(types.ModuleType):
    """An op's package that can be called as its op function (``__wrapped__`` gives inspect and help the
    function's signature)."""

    def __call__(self, *args, **kwargs):
        return self.__wrapped__(*args, **kwargs)


for _info in pkgutil.iter_modules(__path__):
    if _info.ispkg and _info.name != "common":
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        _function = getattr(_module, _info.name, None)
        if isinstance(_function, types.FunctionType):
            _module.__class__ = OpPackage
            _module.__wrapped__ = _function
            # the function of the same name shadowed the sub-package attribute; the package is the name
            globals()[_info.name] = _module
            __all__.append(_info.name)
