"""The lab: everything that runs experiments on gatelab's mechanisms.

``models`` (the pattern LM), ``tasks`` (MQAR, text, idle), ``train`` (the trainer), ``diagnostics`` (sinks,
massive activations, kurtosis, W8A8, gates), ``presets``, ``spec`` (run specs and named variants: the one
place that builds an LM and its TrainConfig), ``report`` / ``plots`` / ``tables`` (what a run writes), ``kv``
(KV-cache experiments). The library below it (``gatelab.ops``, ``gatelab.mixers``, ``gatelab.cache``,
``gatelab.registry``) never imports the lab.

Each command of the CLI is one call of a function here, loaded on first use:

- ``compare(preset, mixers=..., tasks=..., ...)``: train and compare variants (``gatelab compare``)
- ``cache(CacheStudy(...))``: KV-cache policies, quality vs memory on long contexts (``gatelab cache``)
- ``train_run(RunSpec(...), out_dir)``: train one configuration (``gatelab train``)
- ``merge(run_dirs, out_dir)``: one report from comparisons run in parallel (``gatelab merge``)
- ``inspect_run(run)`` / ``inspect_hf(path)``: diagnostics of saved models or of a local transformers
  checkpoint (``gatelab inspect``)
- ``Variant``, ``RunSpec``, ``build``: a run's typed description and the model + TrainConfig it makes
"""

from __future__ import annotations

import importlib

_EXPORTS = {  # name -> module (a lazy import: ``import gatelab.lab`` stays cheap and cycle-free)
    "compare": "gatelab.lab.comparison",
    "cache": "gatelab.lab.kv.study",
    "CacheStudy": "gatelab.lab.kv.study",
    "train_run": "gatelab.lab.spec",
    "merge": "gatelab.lab.report",
    "inspect_run": "gatelab.lab.inspect",
    "inspect_hf": "gatelab.lab.inspect",
    "Variant": "gatelab.lab.spec",
    "RunSpec": "gatelab.lab.spec",
    "build": "gatelab.lab.spec",
    "parse_variants": "gatelab.lab.spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gatelab.lab' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
