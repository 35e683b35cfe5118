"""The lab: everything that runs experiments on gatelab's mechanisms.

``models`` (the pattern LM), ``tasks`` (MQAR, text, idle), ``train`` (the trainer), ``diagnostics`` (sinks,
massive activations, kurtosis, W8A8, gates), ``presets``, ``report`` / ``plots`` / ``tables`` (what a run
writes), ``kv`` (KV-cache experiments). The library below it (``gatelab.ops``, ``gatelab.mixers``,
``gatelab.cache``, ``gatelab.registry``) never imports the lab.
"""
