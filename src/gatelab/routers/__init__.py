"""Mechanisms that choose between mechanisms: per chunk, head or layer routing between softmax and linear or sparse attention."""
