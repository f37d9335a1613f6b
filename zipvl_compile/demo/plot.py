"""The per-layer figures of a demo run (:func:`facts.collect`) as a PNG (``--plot``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from zipvl_compile.demo.render import MIB


def plot(facts: dict[str, Any], path: Path) -> None:
    """PNG: the kept ratio per layer (bars) above the hi/lo split of the prompt tokens per layer (stacked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, opts, kv = facts["layers"], facts["options"], facts["kv"]
    x = [lay["layer"] for lay in layers]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(min(max(8.0, 0.3 * len(x) + 3), 16), 7.5), sharex=True)
    fig.suptitle(
        f"ZipVL on {facts['model']}\nprompt {facts['prompt_tokens']} tokens, tau = {opts['tau']}, "
        f"KV {opts['hi_bits']}-bit kept / {opts['lo_bits']}-bit other tokens",
        fontsize=12,
    )
    ratio = [math.nan if lay["kept_ratio"] is None else lay["kept_ratio"] for lay in layers]
    top.bar(x, ratio, color="#3b75af", width=0.7, label="kept ratio")
    if facts["mean_kept_ratio"] is not None:
        top.axhline(
            facts["mean_kept_ratio"],
            color="#d1495b",
            linestyle="--",
            linewidth=1.3,
            label=f"mean {facts['mean_kept_ratio']:.3f}: "
            f"{facts['mean_flop_reduction']:.1%} of the prefill attention FLOPs saved",
        )
        if len(x) <= 16:
            for i, r in zip(x, ratio):
                top.text(i, r + 0.01, f"{r:.2f}", ha="center", va="bottom", fontsize=8)
    else:
        top.text(0.5, 0.5, "no sparse prefill ran: every layer stayed dense", transform=top.transAxes, ha="center")
    top.set_ylim(0, 1.3)
    top.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    top.set_ylabel("kept ratio")
    top.set_title("share of the prompt kept by the sparse prefill, per layer (1 = dense)", fontsize=10)
    top.legend(loc="upper left", ncol=2, fontsize=9, frameon=False)
    hi = [lay["hi_tokens"] or 0 for lay in layers]
    lo = [lay["lo_tokens"] or 0 for lay in layers]
    if any(hi) or any(lo):
        bottom.bar(x, hi, color="#3b75af", width=0.7, label=f"hi: kept tokens, {opts['hi_bits']}-bit")
        bottom.bar(x, lo, bottom=hi, color="#f0a202", width=0.7, label=f"lo: other tokens, {opts['lo_bits']}-bit")
        bottom.set_ylim(0, 1.3 * max(h + v for h, v in zip(hi, lo)))
        bottom.legend(loc="upper left", ncol=2, fontsize=9, frameon=False)
        held = (
            ""
            if kv["ratio_vs_dense"] is None
            else f": {kv['bytes'] / MIB:.2f} MiB held vs {kv['bytes_dense'] / MIB:.2f} MiB dense"
        )
        bottom.set_title(f"prompt tokens in the packed KV cache, per layer{held}", fontsize=10)
    else:
        bottom.text(
            0.5,
            0.5,
            f"hi/lo token counts not recorded (KV mode: {kv['mode']})",
            transform=bottom.transAxes,
            ha="center",
        )
    bottom.set_ylabel("tokens")
    bottom.set_xlabel("decoder layer")
    bottom.set_xticks(x)
    bottom.set_xlim(min(x, default=0) - 0.6, max(x, default=0) + 0.6)
    bottom.tick_params(axis="x", labelsize=8)
    for ax in (top, bottom):
        ax.grid(axis="y", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
