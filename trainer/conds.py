"""Conditioning as the trainer passes it around: one tensor, or a dict of tensors batched along dim 0.

A diffusers UNet takes one cross-attention tensor; ComfyUI's models take a dict (cross-attention, SDXL's and
Flux's pooled output, ...). The loop only caches, concatenates and repeats conditioning; these helpers do that
for either form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Cond = torch.Tensor | dict[str, torch.Tensor]


def concat(conds: Sequence[Cond]) -> Cond:
    """Return the conditionings stacked along the batch dimension (every one of the same form and keys).

    Raises:
        ValueError: no conditioning, or dicts with different keys.
    """
    if not conds:
        raise ValueError("no conditioning to concatenate")
    first = conds[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(conds))
    keys = set(first)
    for other in conds[1:]:
        if set(other) != keys:
            raise ValueError(f"conditionings with different parts: {sorted(keys)} and {sorted(other)}")
    return {k: torch.cat([c[k] for c in conds]) for k in first}


def repeat(cond: Cond, n: int) -> Cond:
    """Return a single conditioning (batch 1) repeated ``n`` times along the batch dimension (a view)."""
    if isinstance(cond, torch.Tensor):
        return cond.expand(n, *cond.shape[1:])
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def detached(cond: Cond) -> Cond:
    """Return the conditioning without its autograd history."""
    if isinstance(cond, torch.Tensor):
        return cond.detach()
    return {k: v.detach() for k, v in cond.items()}
