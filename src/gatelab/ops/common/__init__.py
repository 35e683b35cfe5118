"""Pieces that several ops share: validation, backend choice, RoPE, masks, chunk utilities."""
