"""Which keys each query sees in Generalized Neighborhood Attention (Hassani et al., 2025), one
dimension at a time; the mask of a 1D/2D/3D map is the AND of its per-dimension masks.

Per dimension (length L, kernel k, stride s, dilation d), as NATTEN defines it:
- dilation splits the axis into d interleaved groups (coordinate mod d); a query sees keys of its own group
  only, and inside a group of length L_g = ceil((L - g) / d) works on the group coordinate x // d;
- stride groups the (group) coordinates into runs of s queries that share one window, the window of their
  leader: the centre query of the run (the right one of the two centres when s is even) or, when causal,
  the last query of the run; leaders past the end are clamped to L_g - 1;
- non-causal: the window is k consecutive keys, k // 2 left of the leader and k - 1 - k // 2 right of it
  (even k: one more on the left), shifted inward at the borders so that every query sees exactly k keys;
- causal: keys in (leader - k, x], so a query never sees a later key.
"""

from __future__ import annotations

import math

import torch


def visible_1d(
    x: torch.Tensor, y: torch.Tensor, L: int, k: int, s: int, d: int, causal: bool
) -> torch.Tensor:
    """Whether query coordinate x may see key coordinate y along one axis (broadcasting int tensors).

    The common cases (no dilation, no stride) are spelled with fewer integer ops: inside a compiled flex
    kernel this function runs for every score of every partial block, and its cost dominates on CPU.
    """
    if d == 1:
        xi, yi, group_length, same_group = x, y, L, None
    else:
        group = x % d
        xi, yi = x // d, y // d
        group_length = (L - group + d - 1) // d  # L_g: members of the query's dilation group
        same_group = (y % d) == group
    if causal:
        if s == 1:
            visible = (yi <= xi) & (xi - yi < k)
        else:
            leader = torch.clamp((xi // s) * s + s - 1, max=group_length - 1)
            visible = (yi <= xi) & (leader - yi < k)
    else:
        leader = xi if s == 1 else torch.clamp((xi // s) * s + s // 2, max=group_length - 1)
        if d == 1:
            start = torch.clamp(leader - k // 2, 0, L - k)  # shifted inward at both borders
        else:
            start = torch.minimum((leader - k // 2).clamp(min=0), group_length - k)
        visible = (yi >= start) & (yi < start + k)
    return visible if same_group is None else visible & same_group


def neighborhood_mask(
    spatial: tuple[int, ...],
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    causal: tuple[bool, ...],
    device=None,
) -> torch.Tensor:
    """(N, N) bool mask over the row-major flattened map, N = prod(spatial); True = may attend."""
    n = len(spatial)
    mask = torch.ones((1,) * (2 * n), dtype=torch.bool, device=device)
    for i, L in enumerate(spatial):
        pos = torch.arange(L, device=device)
        m = visible_1d(
            pos[:, None], pos[None, :], L, kernel_size[i], stride[i], dilation[i], causal[i]
        )  # (L, L)
        shape = [1] * (2 * n)
        shape[i], shape[n + i] = L, L
        mask = mask & m.view(shape)  # query dims first, then key dims
    N = math.prod(spatial)
    return mask.reshape(N, N)
