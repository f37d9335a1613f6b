"""The attention rule of one sparse prefill, shared by the prefill attention kernels (:mod:`kept_attention`,
:mod:`local_attention`, :mod:`sink_attention`) and the CPU bodies of the sparse op (``runtime.cpu_attention``).

Each of those takes ``(q, k, v, plan)``: q [B, Hq, n, d] with RoPE applied, k and v un-expanded [B, Hkv, n, d]
(Hq = Hkv * n_rep: query head h reads KV head h // n_rep), and a :class:`PrefillPlan`; each reads the fields its
rule needs (the kept-only attention: ``idx``, ``count``, ``scale``, ``n_rep``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class PrefillPlan(NamedTuple):
    """Who attends to what in one sparse prefill, and how.

    mode    str             "paper", "local" or "sinks" (docs/method.md §7).
    keep    bool [B, n]     the kept set T (never padding; the sinks rule also drops a kept padding token).
    idx     int64 [B, n]    idx[b, :count[b]] = the positions of ``keep & valid`` in row b, ascending; the rest
                            of the row is arbitrary but in [0, n) (kept_attention.keep_to_index's convention).
    count   int [B]         kept tokens per row, on q's device.
    valid   bool [B, n]     False = padding token.
    window  int             the local window w (keys i - w < j <= i, the query itself included; >= 1 for the
                            "local" and "sinks" rules).
    sinks   int >= 0        how many leading valid tokens every query sees ("sinks" rule).
    scale   float           the logit scale.
    n_rep   int >= 1        query heads per KV head.
    """

    mode: str
    keep: torch.Tensor
    idx: torch.Tensor
    count: torch.Tensor
    valid: torch.Tensor
    window: int
    sinks: int
    scale: float
    n_rep: int
