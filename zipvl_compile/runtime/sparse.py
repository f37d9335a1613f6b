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

from zipvl_compile.runtime import cpu_attention
from zipvl_compile.runtime.kernels.device import host_reads_are_free, wants_triton
from zipvl_compile.runtime.kernels.kept_attention import kept_causal_attention
from zipvl_compile.runtime.kernels.local_attention import local_attention, local_mask
from zipvl_compile.runtime.kernels.plan import PrefillPlan
from zipvl_compile.runtime.kernels.probe import probe_colsum
from zipvl_compile.runtime.kernels.select import SelectResult, select_kept
from zipvl_compile.runtime.kernels.select_reference import choose_probes
from zipvl_compile.runtime.kernels.sink_attention import sink_attention, sink_mask
from zipvl_compile.runtime.reference import causal_mask, dense_attention

PREFILL_MODES = ("paper", "local", "sinks")

# Prompt length below which sparse prefill cannot beat dense attention, per device type (Selection.dense_below
# = -1), measured (BENCHMARKS.md, "Short prompts"). CUDA: a whole Qwen2-7B-shaped prefill at r = 0.4 is 1.01x HF
# + FA4 at 8k, 1.08x at 16k, 1.19x at 24k on an H200 (the op alone spends ~4 ms of host time per layer, hidden
# behind the model's other work when nothing syncs). CPU: the gathered kept / banded path wins from ~2k tokens at
# r 0.25 and ~4k at r 0.5. Other device types: no threshold.
DENSE_BELOW = {"cuda": 8192, "cpu": 4096}

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


class QKV(NamedTuple):
    """The attention inputs: q [B, Hq, n, d], k and v un-expanded [B, Hkv, n, d]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


class Geometry(NamedTuple):
    """How the queries see the keys: ``is_causal`` ANDs the causal mask (no mask at all means causal), ``scale``
    multiplies the logits, ``n_rep`` query heads share one KV head."""

    is_causal: bool = True
    scale: float = 1.0
    n_rep: int = 1


class Probes(NamedTuple):
    """Which rows probe the keys (:func:`~zipvl_compile.runtime.kernels.select_reference.choose_probes`): the last
    ``n_probe_recent`` valid rows plus ``n_probe_random`` random ones drawn with ``seed``."""

    n_probe_recent: int = 64
    n_probe_random: int = 64
    seed: int = 0


class Selection(NamedTuple):
    """How the kept set is chosen from the probe scores
    (:func:`~zipvl_compile.runtime.kernels.select_reference.select_tokens`).

    tau: Eq. 6 mass fraction; min_keep: floor on the kept count; force_ratio: benchmark-only fixed ratio (0 =
    off); dense_below: prompts shorter than this run dense, every token kept (-1: :data:`DENSE_BELOW` of the
    device; 0: never); score_norm: the Eq. 7 denominator, "probes" (probe rows that see the key) or "n_minus_j"
    (ZipCache's: every valid position at or after the key).
    """

    tau: float = 0.975
    min_keep: int = 64
    force_ratio: float = 0.0
    dense_below: int = 0
    score_norm: str = "probes"

    @property
    def keeps_all(self) -> bool:
        """Every valid token is kept whatever the scores (tau >= 1 and no forced ratio): dense and exact."""
        return self.tau >= 1.0 and self.force_ratio <= 0

    def too_short(self, q: torch.Tensor) -> bool:
        """q [B, H, n, d] is a prompt shorter than ``dense_below`` on its device: the op runs dense."""
        return self.too_short_at(q.shape[2], q.device.type)

    def too_short_at(self, n: int, device_type: str) -> bool:
        """A prompt of ``n`` tokens on a ``device_type`` device is shorter than ``dense_below``."""
        limit = DENSE_BELOW.get(device_type, 0) if self.dense_below < 0 else self.dense_below
        return n < limit

    def runs_dense(self, q: torch.Tensor) -> bool:
        """No selection for q's prompt: every token kept (:attr:`keeps_all`) or the prompt is :meth:`too_short`."""
        return self.runs_dense_at(q.shape[2], q.device.type)

    def runs_dense_at(self, n: int, device_type: str) -> bool:
        """:meth:`runs_dense` for a prompt of ``n`` tokens on a ``device_type`` device (known before the prefill:
        a cache that is told the selection sizes its segments for it)."""
        return self.keeps_all or self.too_short_at(n, device_type)


class Attend(NamedTuple):
    """Who attends to what in a sparse prefill (module docstring): ``prefill_mode`` in :data:`PREFILL_MODES`, the
    ``local_window`` (keys i - window < j <= i; unused by "paper") and the ``sink_tokens`` count ("sinks")."""

    prefill_mode: str = "paper"
    local_window: int = 0
    sink_tokens: int = 0


class Prefill(NamedTuple):
    """The options of a sparse prefill past its probe stage: the attention geometry, how the kept set is
    selected, and who attends to what."""

    geometry: Geometry = Geometry()
    selection: Selection = Selection()
    attend: Attend = Attend()


def probe_rows(q: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, probes: Probes) -> torch.Tensor:
    """int64 [B, m] probe positions of q [B, H, n, d] under ``attn_mask`` (selection.choose_probes). They depend
    only on the validity mask and the seed, so one call serves every layer that shares the mask."""
    _, valid = _validity(q, attn_mask, Geometry(is_causal))
    return _choose(valid, probes).contiguous()


def probe_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    geometry: Geometry,
    probes: Probes,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(colsum, seen) float32 [B, n] of the probe rows over the heads of q (see the module docstring); ``rows``:
    the probe positions of :func:`probe_rows`, computed here when None."""
    geometry, valid = _validity(q, attn_mask, geometry)
    if rows is None:
        rows = _choose(valid, probes)
    q_probe = q.gather(2, rows.clamp(min=0)[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
    if geometry.is_causal and is_key_padding(attn_mask):
        return probe_colsum(q_probe, k, rows, valid, geometry.scale, geometry.n_rep)
    return _masked_probe_colsum(q_probe, k, rows, attn_mask, geometry)


def sparse_attention_scored(
    qkv: QKV, colsum: torch.Tensor, seen: torch.Tensor, attn_mask: torch.Tensor | None, prefill: Prefill
) -> Outputs:
    """Kept set from (colsum, seen) of :func:`probe_scores` over all heads, then attention by ``prefill.attend``."""
    selection = prefill.selection
    if selection.runs_dense(qkv.q):
        return _dense(qkv, attn_mask, prefill.geometry)
    geometry, valid = _validity(qkv.q, attn_mask, prefill.geometry)
    if selection.score_norm == "n_minus_j":
        seen = valid.to(torch.float32).flip(-1).cumsum(dim=-1).flip(-1)
    kept = select_kept(colsum, seen, valid, selection.tau, selection.min_keep, selection.force_ratio)
    out = _attend(qkv, attn_mask, geometry, kept, valid, prefill.attend)
    return out, kept.keep, kept.ratio


def sparse_attention(
    qkv: QKV, attn_mask: torch.Tensor | None, rows: torch.Tensor | None, probes: Probes, prefill: Prefill
) -> Outputs:
    """ZipVL prefill attention on one device: :func:`probe_scores` (on ``rows`` when given) then
    :func:`sparse_attention_scored` (no probe when every token is kept)."""
    if prefill.selection.runs_dense(qkv.q):
        return _dense(qkv, attn_mask, prefill.geometry)
    colsum, seen = probe_scores(qkv.q, qkv.k, attn_mask, prefill.geometry, probes, rows)
    return sparse_attention_scored(qkv, colsum, seen, attn_mask, prefill)


def _choose(valid: torch.Tensor, probes: Probes) -> torch.Tensor:
    return choose_probes(valid, probes.n_probe_recent, probes.n_probe_random, probes.seed)


def _causal_without_mask(geometry: Geometry, attn_mask: torch.Tensor | None) -> Geometry:
    """No mask at all means causal."""
    return geometry._replace(is_causal=geometry.is_causal or attn_mask is None)


def _validity(q: torch.Tensor, attn_mask: torch.Tensor | None, geometry: Geometry) -> tuple[Geometry, torch.Tensor]:
    """(geometry with is_causal set where there is no mask at all, valid bool [B, n])."""
    geometry = _causal_without_mask(geometry, attn_mask)
    return geometry, token_validity(attn_mask, geometry.is_causal, q.shape[0], q.shape[2], q.device)


def _dense(qkv: QKV, attn_mask: torch.Tensor | None, geometry: Geometry) -> Outputs:
    """Every valid token kept: exact dense attention, zero at padding rows, ratio 1. A bool mask that lets every
    query see every key is dropped where reading it is free (on a CPU), so that SDPA takes its causal kernel, as
    the model's own SDPA path does for an all-ones attention mask; then no token is padding, so the validity is
    not derived from the mask and the output is not copied to zero padding rows (one host read in all: ~0.17 ms
    per layer at a 329-token prompt for the copy, ~0.1 ms for the rest)."""
    q = qkv.q
    batch, n = q.shape[0], q.shape[2]
    geometry = _causal_without_mask(geometry, attn_mask)  # before the mask may be dropped below
    if attn_mask is not None and attn_mask.dtype == torch.bool and host_reads_are_free(attn_mask):
        attn_mask = None if bool(attn_mask.all()) else attn_mask
    out = dense_attention(*qkv, attn_mask, geometry.is_causal, geometry.scale, geometry.n_rep)
    valid = token_validity(attn_mask, geometry.is_causal, batch, n, q.device)  # no mask: all ones, no read
    if attn_mask is not None and not (host_reads_are_free(valid) and bool(valid.all())):
        out = torch.where(valid[:, None, :, None], out, 0)
    return out, valid, torch.ones(batch, device=q.device)


def _attend(
    qkv: QKV,
    attn_mask: torch.Tensor | None,
    geometry: Geometry,
    kept: SelectResult,
    valid: torch.Tensor,
    attend: Attend,
) -> torch.Tensor:
    """[B, Hq, n, d]: the prefill attention of ``attend`` given the kept set ``kept`` (kernels.select: its mask
    and index list); see the module docstring. CPU tensors take the gathered / banded bodies of cpu_attention
    where those are faster than the kernels' plain-torch oracles."""
    keep, window, sinks = kept.keep, attend.local_window, attend.sink_tokens
    scale, n_rep = geometry.scale, geometry.n_rep
    if geometry.is_causal and is_key_padding(attn_mask):
        plan = PrefillPlan(attend.prefill_mode, keep, kept.idx, kept.count, valid, window, sinks, scale, n_rep)
        if not wants_triton(qkv.q, None) and cpu_attention.is_faster(attend.prefill_mode, keep.shape[1], window):
            return cpu_attention.prefill_attention(*qkv, plan)
        if attend.prefill_mode == "local":
            return local_attention(*qkv, plan)
        if attend.prefill_mode == "sinks":
            return sink_attention(*qkv, plan)
        return kept_causal_attention(*qkv, plan)
    batch, n = keep.shape
    if attend.prefill_mode == "local":
        rows, pair = valid, local_mask(keep, valid, window)
    elif attend.prefill_mode == "sinks":
        rows, pair = valid, sink_mask(keep, valid, window, sinks)
    else:
        rows, pair = keep, keep[:, None, :, None] & keep[:, None, None, :]
    out = dense_attention(*qkv, attn_mask.expand(batch, 1, n, n) & pair, geometry.is_causal, scale, n_rep)
    return torch.where(rows[:, None, :, None], out, 0)


def _masked_probe_colsum(
    q_probe: torch.Tensor, k: torch.Tensor, probes: torch.Tensor, attn_mask: torch.Tensor, geometry: Geometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 column sums and Eq. 7 denominators for an arbitrary mask: (colsum, seen) float32 [B, n].

    The m x n probe block only (m = number of probes); rows of unused probe slots (-1) count nothing.
    """
    batch, n = probes.shape[0], k.shape[2]
    mask = attn_mask.expand(batch, 1, n, n)[:, 0]
    if geometry.is_causal:
        mask = mask & causal_mask(n, n, k.device)
    rows = mask.gather(1, probes.clamp(min=0)[:, :, None].expand(-1, -1, n)) & (probes >= 0)[:, :, None]
    keys = k.repeat_interleave(geometry.n_rep, dim=1) if geometry.n_rep > 1 else k
    logits = torch.matmul(q_probe.float(), keys.float().transpose(-1, -2)) * geometry.scale
    probs = torch.softmax(logits.masked_fill(~rows[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    return probs.sum(dim=(1, 2)), rows.sum(dim=1).to(torch.float32)
