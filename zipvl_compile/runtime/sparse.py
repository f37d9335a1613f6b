"""ZipVL sparse prefill attention (spec §2-5): probe -> adaptive kept set -> attention among kept tokens.

Shapes: q [B, Hq, n, d], k/v un-expanded [B, Hkv, n, d]; ``attn_mask`` is None or a bool mask broadcastable
to [B, 1, n, n] (True = may attend); ``is_causal`` ANDs the causal mask. Keys no query may see are padding:
never probes, never kept. Nothing here syncs with the host; every shape is static.

Two stages, each the body of an op:
- :func:`probe_scores` -> (colsum, seen) float32 [B, n]: Eq. 5 column sums of the probe rows' attention,
  summed over the query heads given, and the Eq. 7 denominators (probe rows per key, the same for any
  subset of heads). Under tensor parallelism each rank holds a subset of the heads: the graph all-reduces
  colsum (sum) between the stages, so every rank selects from the scores of all heads.
- :func:`sparse_attention_scored` -> (out [B, Hq, n, d], keep bool [B, n], ratio float32 [B]): Eqs. 6-8 on
  the scores, then attention among the kept tokens; out is zero at every non-kept position. With
  ``local_window`` w > 0 instead every valid query attends to the kept keys plus its w most recent keys
  (kernels.local_attention): non-kept tokens get an attention output too (spec §5's zero is the default).
:func:`sparse_attention` is both stages on one device (the single-device op).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

from zipvl_compile.runtime.kernels.kept_attention import keep_to_index, kept_causal_attention
from zipvl_compile.runtime.kernels.local_attention import local_attention, local_mask
from zipvl_compile.runtime.kernels.probe import probe_colsum
from zipvl_compile.runtime.reference import causal_mask, dense_attention
from zipvl_compile.runtime.selection import choose_probes, select_tokens

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


def probe_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    n_rep: int,
    probes: Probes,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(colsum, seen) float32 [B, n] of the probe rows over the heads of q (see the module docstring)."""
    is_causal, valid = _validity(q, attn_mask, is_causal)
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
    local_window: int = 0,
) -> Outputs:
    """Kept set from (colsum, seen) of :func:`probe_scores` over all heads, then attention among kept tokens
    (``local_window`` > 0: every query over the kept keys and its window; see the module docstring)."""
    if selection.keeps_all:
        return _dense(q, k, v, attn_mask, is_causal, scale, n_rep)
    is_causal, valid = _validity(q, attn_mask, is_causal)
    if selection.score_norm == "n_minus_j":
        seen = valid.to(torch.float32).flip(-1).cumsum(dim=-1).flip(-1)
    keep, ratio = _fused(select_tokens, q)(
        colsum, seen, valid, selection.tau, selection.min_keep, selection.force_ratio
    )
    return _attend(q, k, v, attn_mask, is_causal, scale, n_rep, keep, valid, local_window), keep, ratio


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
    local_window: int = 0,
) -> Outputs:
    """ZipVL prefill attention on one device: :func:`probe_scores` then :func:`sparse_attention_scored`
    (no probe when every token is kept)."""
    if selection.keeps_all:
        return _dense(q, k, v, attn_mask, is_causal, scale, n_rep)
    colsum, seen = probe_scores(q, k, attn_mask, is_causal, scale, n_rep, probes)
    return sparse_attention_scored(q, k, v, attn_mask, is_causal, scale, n_rep, colsum, seen, selection, local_window)


_FUSED: dict = {}


def _fused(fn: Callable, like: torch.Tensor) -> Callable:
    """``fn`` compiled by Inductor (dynamic shapes) when running eagerly on CUDA, else ``fn`` itself.

    Selection is a dozen small element-wise/sort kernels. Measured on an H100 at 32k tokens (BENCHMARKS.md):
    fused ``select_tokens`` 0.91 ms, fused ``keep_to_index`` 0.10 ms per layer. Inside a graph being compiled,
    the caller's compiler fuses.
    """
    if not like.is_cuda or torch.compiler.is_compiling():
        return fn
    if fn not in _FUSED:
        _FUSED[fn] = _first_call_checked(fn, torch.compile(fn, dynamic=True, fullgraph=True))
    return _FUSED[fn]


def _first_call_checked(fn: Callable, compiled: Callable) -> Callable:
    """``compiled``, unless its first call fails to compile: then ``fn`` from then on (logged, same results)."""

    def call(*args: object) -> object:
        try:
            out = compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: keep the eager function
            logging.getLogger("zipvl_compile").warning(
                "fusing %s failed (%s): running it eagerly", fn.__name__, type(err).__name__
            )
            _FUSED[fn] = fn
            return fn(*args)
        _FUSED[fn] = compiled
        return out

    return call


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
    local_window: int,
) -> torch.Tensor:
    """[B, Hq, n, d]: attention among the kept tokens ``keep`` bool [B, n], zero at non-kept rows; with
    ``local_window`` > 0 every valid query over the kept keys and its window, zero at padding rows."""
    if is_causal and is_key_padding(attn_mask):
        if local_window > 0:
            return local_attention(q, k, v, keep, valid, local_window, scale, n_rep)
        idx, count = _fused(keep_to_index, q)(keep)
        return kept_causal_attention(q, k, v, idx, count, scale, n_rep)
    batch, n = keep.shape
    if local_window > 0:
        rows, pair = valid, local_mask(keep, valid, local_window)
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
