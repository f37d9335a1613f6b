"""ZipVL sparse prefill attention (docs/method.md §3-§7): probe -> adaptive kept set -> attention by prefill mode.

Shapes: q [B, Hq, n, d], k/v un-expanded [B, Hkv, n, d]; ``attn_mask`` is None or a bool mask broadcastable
to [B, 1, n, n] (True = may attend); ``is_causal`` ANDs the causal mask. Keys no query may see are padding:
never probes, never kept. Nothing here syncs with the host; every shape is static.

Two stages, each the body of an op:
- :func:`probe_scores` -> (colsum, seen) float32 [B, n]: Eq. 5 column sums of the probe rows' attention,
  summed over the query heads given, and the Eq. 7 denominators (probe rows per key, the same for any
  subset of heads). Under tensor parallelism each rank holds a subset of the heads: the graph all-reduces
  colsum (sum) between the stages, so every rank selects from the scores of all heads.
- :func:`sparse_attention_scored` -> (out [B, Hq, n, d], keep bool [B, n], ratio float32 [B]): Eqs. 6-8 on
  the scores (kernels.select), then attention by the prefill mode (:class:`Attend`, docs/method.md §7):
  "paper": kept queries over the kept keys (kernels.kept_attention), zero at every other position;
  "local": every valid query over the kept keys plus its ``window`` most recent keys (kernels.local_attention);
  "sinks": kept queries over the kept keys, and every valid query over its window and the first ``sinks`` valid
  tokens, merged exactly (kernels.sink_attention). Padding rows are zero in every mode.
:func:`sparse_attention` is both stages on one device (the single-device op).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from zipvl_compile.runtime.kernels.kept_attention import kept_causal_attention
from zipvl_compile.runtime.kernels.local_attention import local_attention, local_mask
from zipvl_compile.runtime.kernels.probe import probe_colsum
from zipvl_compile.runtime.kernels.select import select_kept
from zipvl_compile.runtime.kernels.sink_attention import sink_attention, sink_mask
from zipvl_compile.runtime.reference import causal_mask, dense_attention
from zipvl_compile.runtime.selection import choose_probes

PREFILL_MODES = ("paper", "local", "sinks")

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def token_validity(
    attn_mask: torch.Tensor | None, is_causal: bool, batch: int, n: int, device: torch.device
) -> torch.Tensor:
    """bool [B, n]: tokens that are not padding (some query may see them)."""
    if attn_mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    mask = attn_mask.expand(batch, 1, attn_mask.shape[-2], n)
    if is_causal and mask.shape[-2] == n:
        mask = mask & causal_mask(n, n, device)
    return mask.any(dim=-2)[:, 0]


def is_key_padding(attn_mask: torch.Tensor | None) -> bool:
    """True when the mask only says which keys are padding ([B, 1, 1, n]): the fast path applies."""
    return attn_mask is None or attn_mask.shape[-2] == 1


class Probes(NamedTuple):
    """Which rows probe the keys (:func:`~zipvl_compile.runtime.selection.choose_probes`): the last ``recent``
    valid rows plus ``random`` seeded random ones."""

    recent: int
    random: int
    seed: int


class Selection(NamedTuple):
    """How the kept set is chosen from the probe scores (:func:`~zipvl_compile.runtime.selection.select_tokens`).

    tau: Eq. 6 mass fraction; min_keep: floor on the kept count; force_ratio: benchmark-only fixed ratio (0 =
    off); score_norm: the Eq. 7 denominator, "probes" (probe rows that see the key) or "n_minus_j" (ZipCache's:
    every valid position at or after the key).
    """

    tau: float
    min_keep: int
    force_ratio: float
    score_norm: str

    @property
    def keeps_all(self) -> bool:
        """Every valid token is kept whatever the scores (tau >= 1 and no forced ratio): dense and exact."""
        return self.tau >= 1.0 and self.force_ratio <= 0


class Attend(NamedTuple):
    """Who attends to what in a sparse prefill (module docstring): ``mode`` in :data:`PREFILL_MODES`, the local
    ``window`` (keys i - window < j <= i; unused by "paper") and the ``sinks`` count (used by "sinks")."""

    mode: str
    window: int
    sinks: int


def probe_rows(q: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, probes: Probes) -> torch.Tensor:
    """int64 [B, m] probe positions of q [B, H, n, d] under ``attn_mask`` (selection.choose_probes). They depend
    only on the validity mask and the seed, so one call serves every layer that shares the mask."""
    _, valid = _validity(q, attn_mask, is_causal)
    return choose_probes(valid, probes.recent, probes.random, probes.seed).contiguous()


def probe_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    n_rep: int,
    probes: Probes,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(colsum, seen) float32 [B, n] of the probe rows over the heads of q (see the module docstring); ``rows``:
    the probe positions of :func:`probe_rows`, computed here when None."""
    is_causal, valid = _validity(q, attn_mask, is_causal)
    if rows is None:
        rows = choose_probes(valid, probes.recent, probes.random, probes.seed)
    q_probe = q.gather(2, rows.clamp(min=0)[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
    if is_causal and is_key_padding(attn_mask):
        return probe_colsum(q_probe, k, rows, valid, scale, n_rep)
    return _masked_probe_colsum(q_probe, k, rows, attn_mask, is_causal, scale, n_rep)


def sparse_attention_scored(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    n_rep: int,
    colsum: torch.Tensor,
    seen: torch.Tensor,
    selection: Selection,
    attend: Attend,
) -> Outputs:
    """Kept set from (colsum, seen) of :func:`probe_scores` over all heads, then attention by ``attend``."""
    if selection.keeps_all:
        return _dense(q, k, v, attn_mask, is_causal, scale, n_rep)
    is_causal, valid = _validity(q, attn_mask, is_causal)
    if selection.score_norm == "n_minus_j":
        seen = valid.to(torch.float32).flip(-1).cumsum(dim=-1).flip(-1)
    kept = select_kept(colsum, seen, valid, selection.tau, selection.min_keep, selection.force_ratio)
    out = _attend(q, k, v, attn_mask, is_causal, scale, n_rep, kept.keep, valid, attend, (kept.idx, kept.count))
    return out, kept.keep, kept.ratio


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    n_rep: int,
    probes: Probes,
    selection: Selection,
    attend: Attend,
    rows: torch.Tensor | None = None,
) -> Outputs:
    """ZipVL prefill attention on one device: :func:`probe_scores` (on ``rows`` when given) then
    :func:`sparse_attention_scored` (no probe when every token is kept)."""
    if selection.keeps_all:
        return _dense(q, k, v, attn_mask, is_causal, scale, n_rep)
    colsum, seen = probe_scores(q, k, attn_mask, is_causal, scale, n_rep, probes, rows)
    return sparse_attention_scored(q, k, v, attn_mask, is_causal, scale, n_rep, colsum, seen, selection, attend)


def _validity(q: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> tuple[bool, torch.Tensor]:
    """(is_causal, valid bool [B, n]); no mask at all means causal attention."""
    is_causal = is_causal or attn_mask is None
    return is_causal, token_validity(attn_mask, is_causal, q.shape[0], q.shape[2], q.device)


def _dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    n_rep: int,
) -> Outputs:
    """Every valid token kept: exact dense attention, zero at padding rows, ratio 1."""
    is_causal, valid = _validity(q, attn_mask, is_causal)
    out = dense_attention(q, k, v, attn_mask, is_causal, scale, n_rep)
    return torch.where(valid[:, None, :, None], out, 0), valid, torch.ones(q.shape[0], device=q.device)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    n_rep: int,
    keep: torch.Tensor,
    valid: torch.Tensor,
    attend: Attend,
    kept_index: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """[B, Hq, n, d]: the prefill attention of ``attend`` given the kept set ``keep`` bool [B, n] (and its index
    list ``kept_index`` = (idx, count) of kernels.kept_attention); see the module docstring."""
    if is_causal and is_key_padding(attn_mask):
        if attend.mode == "local":
            return local_attention(q, k, v, keep, valid, attend.window, scale, n_rep)
        if attend.mode == "sinks":
            return sink_attention(
                q, k, v, keep, valid, attend.window, attend.sinks, scale, n_rep, kept_index=kept_index
            )
        return kept_causal_attention(q, k, v, *kept_index, scale, n_rep)
    batch, n = keep.shape
    if attend.mode == "local":
        rows, pair = valid, local_mask(keep, valid, attend.window)
    elif attend.mode == "sinks":
        rows, pair = valid, sink_mask(keep, valid, attend.window, attend.sinks)
    else:
        rows, pair = keep, keep[:, None, :, None] & keep[:, None, None, :]
    out = dense_attention(q, k, v, attn_mask.expand(batch, 1, n, n) & pair, is_causal, scale, n_rep)
    return torch.where(rows[:, None, :, None], out, 0)


def _masked_probe_colsum(
    q_probe: torch.Tensor,
    k: torch.Tensor,
    probes: torch.Tensor,
    attn_mask: torch.Tensor,
    is_causal: bool,
    scale: float,
    n_rep: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 column sums and Eq. 7 denominators for an arbitrary mask: (colsum, seen) float32 [B, n].

    The m x n probe block only (m = number of probes); rows of unused probe slots (-1) count nothing.
    """
    batch, n = probes.shape[0], k.shape[2]
    mask = attn_mask.expand(batch, 1, n, n)[:, 0]
    if is_causal:
        mask = mask & causal_mask(n, n, k.device)
    rows = mask.gather(1, probes.clamp(min=0)[:, :, None].expand(-1, -1, n)) & (probes >= 0)[:, :, None]
    keys = k.repeat_interleave(n_rep, dim=1) if n_rep > 1 else k
    logits = torch.matmul(q_probe.float(), keys.float().transpose(-1, -2)) * scale
    probs = torch.softmax(logits.masked_fill(~rows[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    return probs.sum(dim=(1, 2)), rows.sum(dim=1).to(torch.float32)
