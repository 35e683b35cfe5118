"""Mechanisms that choose between mechanisms: per-token, per-head or per-layer routing between softmax and
linear or sparse attention, and query-aware token selection. A router mixer registers a key and is built
from other mixers; with ``return_internals=True`` it reports ``internals["route"]`` (the fraction routed to
the expensive path and its unit) and it counts its own ``flops_per_token(seq_len)``."""
