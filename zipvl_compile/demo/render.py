"""The facts of a demo run (:func:`facts.collect`) as text tables or as one JSON object."""

from __future__ import annotations

import json
from typing import Any

MIB = 2.0**20
FIRST_LINE_CHARS = 40  # a generated text's first line in the closing --compare-dense table, at most


def as_json(facts: dict[str, Any]) -> str:
    """The facts as one JSON object (``--json``)."""
    return json.dumps(facts, indent=1)


def render(facts: dict[str, Any], full_report: bool = False) -> str:
    """The text output: model, compile report, per-layer table, KV cache, then speed and memory (with
    --compare-dense: the dense text and one closing table of both runs). full_report: every attention site."""
    z, dense = facts["zipvl"], facts["dense"]
    lines = [""]
    if z["text"] is None:
        lines += [
            f"--- zipvl output ({facts['model']}: random weights, no tokenizer) ---",
            f"new token ids: {z['token_ids']}",
            "",
        ]
    lines += _header(facts) + _compile_report(facts, full_report) + _layers(facts) + _kv(facts["kv"])
    if dense is None:
        lines += ["", "--- speed and memory ---", *_table(_speed_rows(facts))]
    else:
        lines += [
            "",
            "--- dense (uncompiled) output, same prompt ---",
            dense["text"] if dense["text"] is not None else f"new token ids: {dense['token_ids']}",
            "",
            "--- dense vs zipvl, same prompt ---",
            *_table(_comparison_rows(facts)),
        ]
    return "\n".join(lines)


def _header(facts: dict[str, Any]) -> list[str]:
    compiled = facts["compiled"]
    lines = [
        f"=== {facts['model']}: {facts['architecture']}, {facts['decoder_layers']} decoder layers, "
        f"{facts['device']} {facts['dtype']}, prompt {facts['prompt_tokens']} tokens ===",
        "options: " + ", ".join(f"{k}={v}" for k, v in facts["options"].items()),
        f"compiled with zipvl: the language model ({compiled['language_model']})"
        + ("; generate uses the packed ZipVLCache" if compiled["packed_kv_cache"] else ""),
        "sparse prefill mode that ran: " + (", ".join(compiled["prefill_modes"]) or "none (every prefill site dense)"),
    ]
    if compiled["vision_tower"]:
        lines.append(
            f"vision tower ({compiled['vision_tower']}): compiled with zipvl too, to show that the "
            "backend leaves its attention alone"
        )
    return lines


def _compile_report(facts: dict[str, Any], full_report: bool) -> list[str]:
    lines = ["", facts["report"]["summary"].replace("zipvl compile report", "--- compile report") + " ---"]
    if full_report:
        return lines + facts["full_report"].splitlines()[1:]
    rows = [("kind", "sites", "layers", "what the backend did")]
    rows += [(g["kind"], g["sites"], _ranges(g["layers"]), g["outcome"]) for g in facts["report"]["groups"]]
    return lines + _table(rows) + ["  (--full-report: every site with its mask, KV write and module path)"]


def _layers(facts: dict[str, Any]) -> list[str]:
    rows = [("layer", "kept ratio", "attn FLOPs saved", "hi tokens", "lo tokens")]
    rows += [
        (
            lay["layer"],
            _num(lay["kept_ratio"], ".3f"),
            _num(lay["flop_reduction"], ".1%"),
            _num(lay["hi_tokens"], "d"),
            _num(lay["lo_tokens"], "d"),
        )
        for lay in facts["layers"]
    ]
    if facts["mean_kept_ratio"] is not None:
        rows.append(("mean", f"{facts['mean_kept_ratio']:.3f}", f"{facts['mean_flop_reduction']:.1%}", "", ""))
    table = _table(rows) if len(rows) > 1 else ["  no decoder layer ran a sparse prefill"]
    if any(lay["dense_by_length"] for lay in facts["layers"]):
        table.append(
            f"  dense prefill: the {facts['prompt_tokens']}-token prompt is shorter than dense_below, where sparse "
            "prefill stops paying on this device (--dense-below 0 runs it sparse)"
        )
    return ["", "--- per decoder layer (last prefill) ---", *table]


def _kv(kv: dict[str, Any]) -> list[str]:
    if kv["ratio_vs_dense"] is not None:
        line = (
            f"  {kv['mode']} ({kv['reason']}): {kv['bytes']:,} bytes held vs {kv['bytes_dense']:,} in the "
            f"model's dense cache ({kv['ratio_vs_dense']:.1%})"
        )
        if kv["reserves"]:
            line += f"\n  held beyond the tokens: {kv['reserves']}"
    else:
        reason = f"; {kv['reason']}" if kv["reason"] else ""
        line = f"  KV bytes not available (KV mode: {kv['mode'] or 'not recorded'}{reason})"
    return ["", "--- KV cache ---", line]


def _speed_rows(facts: dict[str, Any]) -> list[tuple]:
    z = facts["zipvl"]
    return [
        ("", "zipvl"),
        ("compile + warm-up", f"{z['compile_s']:.1f} s"),
        (_prefill_label(z), f"{z['prefill_s']:.3f} s"),
        ("decode", _num(z["decode_tokens_per_s"], ".1f", " tokens/s")),
        ("new tokens", z["new_tokens"]),
        (f"peak memory ({z['peak_memory_kind']})", _mib(z["peak_memory_bytes"])),
    ]


def _comparison_rows(facts: dict[str, Any]) -> list[tuple]:
    """Dense and zipvl side by side: first line of text, prefill, decode speed, peak memory, KV bytes, mean
    kept ratio (the dense run keeps every token; its KV bytes are those of the model's own dense cache)."""
    z, dense, kv = facts["zipvl"], facts["dense"], facts["kv"]
    runs = (dense, z)
    if kv["ratio_vs_dense"] is not None:
        kv_cells = (f"{kv['bytes_dense']:,} bytes, dense", f"{kv['bytes']:,} bytes ({kv['ratio_vs_dense']:.1%})")
    else:
        kv_cells = ("-", "-")
    return [
        ("", "dense (uncompiled)", "zipvl"),
        ("text, first line", *[_first_line(r) for r in runs]),
        (_prefill_label(z), *[f"{r['prefill_s']:.3f} s" for r in runs]),
        ("decode", *[_num(r["decode_tokens_per_s"], ".1f", " tokens/s") for r in runs]),
        (f"peak memory ({z['peak_memory_kind']})", *[_mib(r["peak_memory_bytes"]) for r in runs]),
        ("KV cache", *kv_cells),
        ("mean kept ratio", "1 (every token)", _num(facts["mean_kept_ratio"], ".3f")),
        ("compile + warm-up", "-", f"{z['compile_s']:.1f} s"),
    ]


def _prefill_label(run: dict[str, Any]) -> str:
    return f"prefill (median of {run['prefill_runs']})" if run.get("prefill_runs", 1) > 1 else "prefill"


def _first_line(run: dict[str, Any]) -> str:
    """The first non-empty line of the run's text (its token ids without a tokenizer), cut to fit."""
    if run["text"] is None:
        line = "ids " + " ".join(map(str, run["token_ids"]))
    else:
        line = next((s.strip() for s in run["text"].splitlines() if s.strip()), "(no text)")
    return line if len(line) <= FIRST_LINE_CHARS else line[: FIRST_LINE_CHARS - 3].rstrip() + "..."


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'; [] -> '-'."""
    spans: list[list[int]] = []
    for v in sorted(values):
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) or "-"


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / MIB:+.1f} MiB"


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
