"""End-to-end prefill: a Qwen2-7B-shaped random-weight HF model (bf16) with ZipVL sparse prefill vs dense.

    python -m bench.prefill                 # GPU, one invocation
    python -m bench.prefill --smoke         # CPU check of the same code on a tiny model

Compared in the same run, at each prompt length (B = 1, one forward with ``logits_to_keep=1``, no cache):
- ``hf_sdpa``: HF eager with ``attn_implementation="sdpa"`` (the stock path);
- ``hf_fa4``: HF eager with FlashAttention-4 registered as an attention function (when importable);
- ``zipvl``: ``torch.compile(backend="zipvl", options={"inner": "eager", "force_ratio": r})``. The inner
  compiler is eager so that only attention differs from the baselines. ``force_ratio`` (benchmark-only) fixes
  the kept ratio because random weights have no sparse structure; probing and selection still run.
Reported: median prefill time, speedup over hf_sdpa, the Amdahl ceiling (from the dense attention share
measured with a forward hook-free split: dense attention time x (1 - r^2) saved), and peak GPU memory.
Writes $OUT/prefill_e2e.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import datetime

import torch
import transformers as T

from bench._timing import device_name, markdown_table, median_ms, write_json

QWEN2_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=131072,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def register_fa4() -> bool:
    try:
        from flash_attn.cute import flash_attn_func
    except Exception:  # noqa: BLE001 - optional dependency, any import failure means "absent"
        return False

    def fa4_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out = flash_attn_func(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scaling, causal=True
        )
        out = out[0] if isinstance(out, tuple) else out
        return out, None

    T.AttentionInterface.register("fa4", fa4_attention)
    return True


def build_model(config: dict, attn: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.Qwen2Config(**config)
    with torch.device(device):
        model = T.Qwen2ForCausalLM._from_config(cfg, dtype=dtype, attn_implementation=attn).eval()
    return model


def compile_zipvl(
    model: torch.nn.Module, ratio: float, mode: str = "sinks", local_window: int = 128, dense_below: int | None = None
) -> torch.nn.Module:
    """``model`` compiled by the zipvl backend as this benchmark times it: inner compiler eager (only attention
    differs from the baselines), tau 0.975, the kept ratio forced to ``ratio`` (random weights have no structure)."""
    options = dict(inner="eager", force_ratio=ratio, tau=0.975, prefill_mode=mode, local_window=local_window)
    return torch.compile(model, backend="zipvl", dynamic=False, options={**options, "dense_below": dense_below})


def forward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """One prefill forward of ``ids`` [1, n], no cache, the last logits only. An explicit all-ones attention_mask,
    as generate passes: without one, HF adds a packed-sequence term to the in-graph mask (data dependent), which
    the backend must keep as a full n x n mask (slow path)."""
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=1)


def _time(model, ids, reps: int) -> tuple[float, float | None]:
    run = lambda: forward(model, ids)
    run()  # warm-up (and compilation for zipvl)
    if ids.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = median_ms(run, warmup_ms=1, rep_ms=reps)
    peak = torch.cuda.max_memory_allocated() / 2**20 if ids.is_cuda else None
    return ms, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="*", default=[32768, 65536])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--rep-ms", type=float, default=2000)
    parser.add_argument("--prefill-modes", nargs="*", default=["sinks"], help="zipvl prefill_mode values to time")
    parser.add_argument("--local-window", type=int, default=128, help="zipvl's local_window option")
    parser.add_argument(
        "--dense-below", type=int, default=None, help="zipvl's dense_below option (default: the device's crossover)"
    )
    args = parser.parse_args()
    import zipvl_compile

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    config, lengths = (TINY, [256, 512]) if args.smoke else (QWEN2_7B, args.lengths)
    variants = ["sdpa"] + (["fa4"] if not args.smoke and register_fa4() else [])
    rows = []
    model = build_model(config, "sdpa", device, dtype)
    for n in lengths:
        ids = torch.randint(0, config["vocab_size"], (1, n), device=device)
        baselines: dict = {}
        for attn in variants:
            model.set_attn_implementation(attn)
            baselines[f"hf_{attn}_ms"], baselines[f"hf_{attn}_peak_mb"] = _time(model, ids, args.rep_ms)
        model.set_attn_implementation("sdpa")
        for mode in args.prefill_modes:
            row: dict = {"n": n, "ratio": args.ratio, "prefill_mode": mode, "local_window": args.local_window}
            row["dense_below"] = args.dense_below
            row.update(baselines)
            torch._dynamo.reset()
            zipvl_compile.reset_report()
            compiled = compile_zipvl(model, args.ratio, mode, args.local_window, args.dense_below)
            row["zipvl_ms"], row["zipvl_peak_mb"] = _time(compiled, ids, args.rep_ms)
            ratios = zipvl_compile.report().kept_ratios()
            row["zipvl_kept_ratio"] = round(sum(ratios.values()) / max(1, len(ratios)), 4)
            row["speedup_vs_sdpa"] = row["hf_sdpa_ms"] / row["zipvl_ms"]
            if "hf_fa4_ms" in row:
                row["speedup_vs_fa4"] = row["hf_fa4_ms"] / row["zipvl_ms"]
            rows.append(row)
            print(row, flush=True)
    columns = [
        "n",
        "ratio",
        "prefill_mode",
        "local_window",
        "dense_below",
        "zipvl_kept_ratio",
        "hf_sdpa_ms",
        "hf_fa4_ms",
        "zipvl_ms",
        "speedup_vs_sdpa",
        "speedup_vs_fa4",
        "hf_sdpa_peak_mb",
        "hf_fa4_peak_mb",
        "zipvl_peak_mb",
    ]
    print(markdown_table(rows, columns))
    write_json(
        "prefill_e2e.json",
        {"date": datetime.date.today().isoformat(), "device": device_name(), "torch": torch.__version__, "rows": rows},
    )


if __name__ == "__main__":
    main()
