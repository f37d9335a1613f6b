"""Every figure of a demo run as plain JSON values: the text output, the plot and ``--json`` are made from this."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

import zipvl_compile
from zipvl_compile.demo.load import Subject
from zipvl_compile.model_parts import language_model


def collect(
    subject: Subject,
    device: str,
    dtype: torch.dtype,
    options: dict[str, Any],
    zipvl: dict[str, Any],
    dense: dict[str, Any] | None,
    tower: torch.nn.Module | None,
) -> dict[str, Any]:
    """The facts of the run from the compile report of ``zipvl_compile.report()``.

    zipvl / dense: the figures of ``run.generate`` for the compiled run (plus ``compile_s``) and for the
    uncompiled one (None without --compare-dense); tower: the vision tower compiled beside the language model.
    """
    rep = zipvl_compile.report()
    ratios, flops = rep.kept_ratios(), rep.flop_reduction()
    n_layers = subject.model.config.get_text_config().num_hidden_layers
    layers = []
    # the report keeps (cleared) entries of graphs compiled earlier in the process: only this model's layers
    for i in sorted(i for i in set(rep.layers) | set(ratios) if i < n_layers):
        stats = rep.layers.get(i)
        layers.append(
            {
                "layer": i,
                "kept_ratio": ratios.get(i),
                "flop_reduction": flops.get(i),
                "dense_by_length": stats is not None and stats.too_short,
                "hi_tokens": None if stats is None else stats.hi_tokens,
                "lo_tokens": None if stats is None else stats.lo_tokens,
            }
        )
    held, dense_kv = rep.kv_bytes, rep.kv_bytes_dense
    return {
        "model": subject.name,
        "architecture": type(subject.model).__name__,
        "decoder_layers": n_layers,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": subject.inputs["input_ids"].shape[1],
        "options": options,
        "compiled": {
            "language_model": type(language_model(subject.model)).__name__,
            "vision_tower": None if tower is None else type(tower).__name__,
            "packed_kv_cache": rep.kv_mode == "packed",
            "prefill_modes": rep.prefill_modes(),
        },
        "report": {
            "summary": str(rep).splitlines()[0],
            "graphs": len(rep.graphs),
            "sites": [dataclasses.asdict(s) for s in rep.sites],
            "groups": _site_groups(rep.sites),
        },
        "layers": layers,
        "mean_kept_ratio": sum(ratios.values()) / len(ratios) if ratios else None,
        "mean_flop_reduction": sum(flops.values()) / len(flops) if flops else None,
        "kv": {
            "mode": rep.kv_mode,
            "reason": rep.kv_mode_reason,
            "bytes": held,
            "bytes_dense": dense_kv,  # the model's own dense cache of the same tokens, in the model's dtype
            "ratio_vs_dense": held / dense_kv if held is not None and dense_kv else None,
            "reserves": rep.kv_reserves,
        },
        "zipvl": zipvl,
        "dense": dense,
        "full_report": str(rep),
    }


def _site_groups(sites: list) -> list[dict[str, Any]]:
    """Sites grouped by (kind, outcome) in order of first appearance, with their decoder layers."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for s in sites:
        if s.rewritten:
            outcome = s.op + (f" (dense: {s.dense_reason})" if s.dense_reason else "")
        else:
            outcome = f"left alone: {s.reason}"
        group = groups.setdefault(
            (s.kind, outcome), {"kind": s.kind, "rewritten": s.rewritten, "outcome": outcome, "sites": 0, "layers": []}
        )
        group["sites"] += 1
        if s.layer is not None and s.layer not in group["layers"]:
            group["layers"].append(s.layer)
    return list(groups.values())
