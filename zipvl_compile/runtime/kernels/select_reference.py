"""Probe choice and kept-set selection (ZipVL Eqs. 6-8), plain torch on the device, no host sync.

Both functions keep fixed output shapes and use only traceable ops (no ``.item()``, no data-dependent
shapes, no ``torch.Generator``), so they run unchanged under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 0 <= x, c < 2**32 without overflowing int64.

    x * (c mod 2**31) < 2**63; the top bit of c adds x * 2**31, i.e. (x mod 2) * 2**31 modulo 2**32.
    """
    low = x * (c & 0x7FFFFFFF)
    if c >> 31:
        low = low + ((x & 1) << 31)
    return low & _MASK32


def _mix32(x):
    """A bijective 32-bit integer mixer (xor-shift / multiply rounds) on Python ints or int64 tensors."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def _random_keys(rank: torch.Tensor, seed: int) -> torch.Tensor:
    """int64 keys in [0, 2**32 * n), distinct for distinct ``rank`` (< n), pseudo-random in ``seed``.

    Keyed on the rank among valid tokens, so a prompt draws the same probes whatever its padding.
    """
    n = rank.shape[-1]
    salt = _mix32(seed & _MASK32)
    h = _mix32(_mix32((rank & _MASK32) ^ salt) ^ _mix32(salt ^ 0x9E3779B9))
    return h * n + rank


def choose_probes(valid: torch.Tensor, n_recent: int, n_random: int, seed: int) -> torch.Tensor:
    """int64 [B, m] probe positions, m = min(n, n_recent + n_random), ascending, -1 in unused slots.

    valid: bool [B, n] (False = padding). Probes of a row = its last ``n_recent`` valid positions plus
    ``n_random`` distinct positions drawn uniformly without replacement (seeded, deterministic) from its
    other valid positions; when a row has at most m valid positions, every one is a probe.
    """
    batch, n = valid.shape
    m = min(n, n_recent + n_random)
    rank = valid.to(torch.int64).cumsum(dim=-1) - 1
    # a valid position has n_valid - rank valid positions from it to the end
    probe = valid & (rank[:, -1:] + 1 - rank <= n_recent)
    positions = torch.arange(n, device=valid.device, dtype=torch.int64).expand(batch, n)
    if n_random > 0:
        keys = torch.where(valid & ~probe, _random_keys(rank, seed), -1)
        top = torch.topk(keys, min(n_random, n), dim=-1)
        probe = probe | torch.zeros_like(probe).scatter(-1, top.indices, top.values >= 0)
    # compact: the k-th probe of a row goes to slot k; non-probes all write -1 into a spare slot m
    slot = torch.where(probe, probe.to(torch.int64).cumsum(dim=-1) - 1, m)
    out = torch.full((batch, m + 1), -1, dtype=torch.int64, device=valid.device)
    return out.scatter(-1, slot, torch.where(probe, positions, -1))[:, :m]


def select_tokens(
    colsum: torch.Tensor, seen: torch.Tensor, valid: torch.Tensor, tau: float, min_keep: int, force_ratio: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept set of one layer -> (keep bool [B, n], ratio float32 [B] = kept / valid count).

    colsum, seen: float32 [B, n] from ``probe_colsum`` (Eq. 5 column sums, Eq. 7 denominators);
    valid: bool [B, n]. Eq. 6: p = 1 + the number of descending-sorted prefix sums of colsum below
    tau * total (clamped to the valid count; tau >= 1 gives every valid key). Eqs. 7-8: keep the p valid
    keys with the largest colsum / seen (0 where seen == 0), ties to the lower position. Then the last valid
    token is forced in, and the set is raised to min(min_keep, valid count) tokens in score order.
    Padding keys are never kept. ``force_ratio`` > 0 (benchmark-only) replaces Eq. 6 by
    p = round(force_ratio * valid count): random weights have no sparse structure to adapt to.
    """
    batch, n = valid.shape
    n_valid = valid.sum(dim=-1)
    mass = torch.where(valid, colsum, 0.0)
    if force_ratio > 0:
        p = torch.round(force_ratio * n_valid.to(torch.float64)).to(n_valid.dtype).clamp(min=1)
    elif tau >= 1.0:
        p = n_valid
    else:
        prefix = mass.sort(dim=-1, descending=True).values.cumsum(dim=-1)
        below = (prefix < tau * prefix[:, -1:]).sum(dim=-1)
        p = torch.minimum(below + 1, n_valid)
    score = torch.where(seen > 0, colsum / seen.clamp(min=1.0), 0.0)
    score = torch.where(valid, score, float("-inf"))
    order = score.sort(dim=-1, descending=True, stable=True).indices
    positions = torch.arange(n, device=valid.device, dtype=torch.int64).expand(batch, n)
    rank = torch.empty_like(order).scatter(-1, order, positions)
    last = torch.where(valid, positions, -1).amax(dim=-1, keepdim=True)
    keep = valid & ((rank < p[:, None]) | (positions == last))
    need = (torch.clamp(n_valid, max=min_keep) - keep.sum(dim=-1)).clamp(min=0)
    spare = (valid & ~keep).gather(-1, order)
    take = spare & (spare.to(torch.int64).cumsum(dim=-1) <= need[:, None])
    keep = keep | torch.zeros_like(keep).scatter(-1, order, take)
    ratio = keep.sum(dim=-1).to(torch.float32) / n_valid.clamp(min=1).to(torch.float32)
    return keep, ratio
