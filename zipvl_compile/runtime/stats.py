"""Runtime statistics slots: small device tensors the ops write (no host sync) and the report reads.

A slot is allocated at compile time on the graph's device; ``zipvl.sparse_attention`` given a slot index
writes (mean kept ratio, mean squared kept ratio, 1 if it ran dense because the prompt was short else 0) of each
prefill into it.
"""

from __future__ import annotations

import torch

_SLOTS: list[torch.Tensor] = []


def new_slot(device: torch.device) -> tuple[int, torch.Tensor]:
    """(index, float32 [3] tensor filled with -1 = "not run yet")."""
    _SLOTS.append(torch.full((3,), -1.0, dtype=torch.float32, device=device))
    return len(_SLOTS) - 1, _SLOTS[-1]


def record_ratio(slot: int, ratio: torch.Tensor | None, short: bool) -> None:
    """Store (mean r, mean r^2, short) of a batch of kept ratios ``ratio`` float32 [B] into ``slot``; ``short``:
    the prefill ran dense because the prompt was shorter than the op's ``dense_below``. ``ratio`` None: the prefill
    kept every token (r = 1 in every row), stored without reading a ratio (two fills instead of five ops)."""
    if slot < 0:
        return
    moments, flag = _SLOTS[slot][:2], _SLOTS[slot][2]
    if ratio is None:
        moments.fill_(1.0)
    else:
        moments.copy_(torch.stack([ratio.mean(), (ratio * ratio).mean()]))
    flag.fill_(float(short))  # a fill: no host-to-device copy (a blocking one syncs the stream)
