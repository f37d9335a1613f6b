"""Side by side with peers (issue 7): zipvl vs HF QuantizedCache (quanto, HQQ) vs NVIDIA kvpress presses.

    python -m bench.peers [--model FILE.gguf] [--context 2048] [--continuation 256] [--only NAME ...]
                          [--plot docs/peers.png] [--threads N]

The continuation task of :mod:`bench.accuracy` (its ``corpus_ids``, ``load`` and ``run``): prefill ``context``
tokens of the Python Language Reference topics, teacher-force the next ``continuation`` tokens one decode step at a
time, on the CPU in fp32. Methods: dense (reference, stock DynamicCache); zipvl at tau in {0.96, 0.975, 1.0} and
bits 4/2, 8/4 with the paper's prefill, plus 4/2 with the local and sinks prefills at tau < 1; transformers'
``QuantizedCache`` with the quanto backend (2 and 4 bits, keys per token and per channel) and the HQQ backend (axis
1); kvpress expected-attention, SnapKV and knorm presses removing 50% and 75% of the prompt's KV. Per method:
continuation perplexity, its change vs dense, top-1 agreement with dense, KV bytes held after prefill + continuation
(every tensor of the cache: codes, scales, zero points, residual/tail, evicted caches' kept tokens), those bytes vs
a bf16 cache of the tokens the dense cache holds, the same with every fp32 tensor counted at 2 bytes (what the cache
would hold for a bf16 model), prefill seconds and decode tokens/s. A method that cannot run with the installed
versions gets a row with its error and version. Writes ``bench/results/peers_<model>.json``, prints a markdown table
and, with ``--plot``, adds this model's panel to a perplexity-vs-KV-bytes figure (one panel per results file
present)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import pathlib
import time
from collections.abc import Iterator

import torch

from bench.accuracy import corpus_ids, load, run

RESULTS = pathlib.Path(__file__).parent / "results"
TAUS = (0.96, 0.975, 1.0)
BITS = ((4, 2), (8, 4))
PRESSES = (("expected-attention", "ExpectedAttentionPress"), ("SnapKV", "SnapKVPress"), ("knorm", "KnormPress"))


def methods() -> list[tuple[str, str, dict]]:
    """(name, family, parameters) of every method compared, the dense reference first."""
    out = [("dense fp32", "dense", {})]
    out += [
        (f"zipvl tau={tau} {hi}/{lo} paper", "zipvl", dict(tau=tau, hi_bits=hi, lo_bits=lo, prefill_mode="paper"))
        for tau in TAUS
        for hi, lo in BITS
    ]
    out += [
        (f"zipvl tau={tau} 4/2 {mode}", "zipvl", dict(tau=tau, hi_bits=4, lo_bits=2, prefill_mode=mode))
        for tau in TAUS
        if tau < 1
        for mode in ("local", "sinks")
    ]
    for nbits in (4, 2):
        out.append((f"quanto {nbits}-bit", "quantized", dict(backend="quanto", nbits=nbits)))
        out.append(
            (f"quanto {nbits}-bit, K per-channel", "quantized", dict(backend="quanto", nbits=nbits, axis_key=-1))
        )
    out += [
        (f"hqq {nbits}-bit (axis 1)", "quantized", dict(backend="hqq", nbits=nbits, axis_key=1, axis_value=1))
        for nbits in (4, 2)
    ]
    out += [
        (f"kvpress {label} {ratio:.0%}", "kvpress", dict(press=cls, compression_ratio=ratio))
        for label, cls in PRESSES
        for ratio in (0.5, 0.75)
    ]
    return out


def tensor_nbytes(obj: object, as_bf16: bool = False) -> int:
    """Bytes of every tensor in ``obj``: plain tensors, tensor subclasses (quanto's QTensors, through
    ``__tensor_flatten__``), and tuples, lists and dicts of them (HQQ's ``(codes, meta)``). ``as_bf16``: count
    fp32 tensors at 2 bytes an element (what they hold for a bf16 model)."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_nbytes(getattr(obj, name), as_bf16) for name in names)
        size = 2 if as_bf16 and obj.dtype == torch.float32 else obj.element_size()
        return obj.numel() * size
    if isinstance(obj, (tuple, list)):
        return sum(tensor_nbytes(item, as_bf16) for item in obj)
    if isinstance(obj, dict):
        return sum(tensor_nbytes(item, as_bf16) for item in obj.values())
    return 0


def cache_nbytes(cache: object, as_bf16: bool = False) -> int:
    """Bytes a cache holds over its layers: a ZipVLCache's packed buffers (``buffers()``), else each layer's
    ``keys``/``values`` and, for a QuantizedCache, its quantised keys and values with their scales."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "buffers"):
            total += tensor_nbytes(layer.buffers(), as_bf16)
            continue
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += tensor_nbytes(getattr(layer, name, None), as_bf16)
    return total


@contextlib.contextmanager
def press_context(press: object, model: torch.nn.Module) -> Iterator[None]:
    """``with press(model):`` made to run on transformers 5.17: kvpress 0.5.2's hook reads ``cache_position``
    from the attention layer's kwargs, which Llama/Gemma3 no longer pass, so a pre-hook supplies
    ``arange(past, past + q_len)``. Sliding-window layers are left alone, as kvpress does for Gemma3 (its rule
    only recognises the multimodal class; their cache is already bounded by the window)."""
    compress = press.forward_hook

    def forward_hook(module, args, kwargs, output):
        return output if getattr(module, "is_sliding", False) else compress(module, args, kwargs, output)

    def supply_cache_position(module, args, kwargs):
        if kwargs.get("cache_position") is None:
            past = kwargs["past_key_values"].get_seq_length(module.layer_idx)
            kwargs["cache_position"] = torch.arange(past, past + kwargs["hidden_states"].shape[1])
        return args, kwargs

    press.forward_hook = forward_hook
    handles = [
        layer.self_attn.register_forward_pre_hook(supply_cache_position, with_kwargs=True)
        for layer in model.model.layers
    ]
    try:
        with press(model):
            yield
    finally:
        for handle in handles:
            handle.remove()


def version(family: str) -> str:
    """The installed version of the package a method family depends on ('-' for this project and dense)."""
    package = {"quanto": "optimum-quanto", "hqq": "hqq", "kvpress": "kvpress"}.get(family)
    if package is None:
        return "-"
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{package} not installed"


def run_method(model, ids: torch.Tensor, context: int, family: str, params: dict) -> dict:
    """One method through :func:`bench.accuracy.run`: nll, predictions, timings and the cache it filled."""
    if family == "dense":
        return run(model, ids, context, None)
    if family == "zipvl":
        return run(model, ids, context, params)
    if family == "quantized":
        from transformers import QuantizedCache

        return run(model, ids, context, None, cache=QuantizedCache(config=model.config, **params))
    import kvpress

    press = getattr(kvpress, params["press"])(compression_ratio=params["compression_ratio"])
    return run(model, ids, context, None, prefill_context=press_context(press, model))


def row(name: str, family: str, params: dict, res: dict, dense: dict, bf16_bytes: int, continuation: int) -> dict:
    """The reported metrics of one finished method, against the dense run."""
    ppl = math.exp(sum(res["nll"]) / len(res["nll"]))
    dense_ppl = math.exp(sum(dense["nll"]) / len(dense["nll"]))
    kv_bytes = cache_nbytes(res["cache"])
    return {
        "method": name,
        "family": family,
        "params": params,
        "ppl": round(ppl, 4),
        "ppl_change": round(ppl / dense_ppl - 1, 5),
        "top1_agree": round(sum(a == b for a, b in zip(res["preds"], dense["preds"])) / len(dense["preds"]), 4),
        "kv_bytes": kv_bytes,
        "kv_vs_bf16": round(kv_bytes / bf16_bytes, 4),
        "kv_vs_bf16_model": round(cache_nbytes(res["cache"], as_bf16=True) / bf16_bytes, 4),
        "kept_ratio": res.get("kept_ratio"),
        "prefill_s": round(res["prefill_s"], 2),
        "decode_tok_s": round((continuation - 1) / res["decode_s"], 2),
        "version": version(params.get("backend", family)),
        "error": None,
    }


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table (errors in their own column)."""
    lines = [
        "| method | perplexity | vs dense | top-1 agree | KV MiB held | vs bf16 | vs bf16 (bf16 model) "
        "| prefill s | decode tok/s | error |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['method']} | - | - | - | - | - | - | - | - | {r['version']}: {r['error']} |")
            continue
        lines.append(
            f"| {r['method']} | {r['ppl']:.3f} | {r['ppl_change']:+.2%} | {r['top1_agree']:.1%} "
            f"| {r['kv_bytes'] / 2**20:.2f} | {r['kv_vs_bf16']:.1%} | {r['kv_vs_bf16_model']:.1%} "
            f"| {r['prefill_s']:.2f} | {r['decode_tok_s']:.1f} | |"
        )
    return "\n".join(lines)


def plot(path: str) -> None:
    """Perplexity vs KV bytes (bf16-model accounting), one marker per method, one panel per results file."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(RESULTS.glob("peers_*.json"))
    markers = {
        "dense": ("*", "black"),
        "zipvl": ("o", "tab:red"),
        "quanto": ("s", "tab:blue"),
        "hqq": ("D", "tab:cyan"),
        "kvpress": ("^", "tab:green"),
    }
    fig, axes = plt.subplots(1, len(files), figsize=(7.5 * len(files), 6), squeeze=False)
    for ax, file in zip(axes[0], files):
        data = json.loads(file.read_text())
        for r in (r for r in data["rows"] if not r["error"]):
            kind = r["params"].get("backend", r["family"])
            marker, color = markers[kind]
            ax.scatter(100 * r["kv_vs_bf16_model"], r["ppl"], marker=marker, color=color, s=60, label=kind)
            ax.annotate(
                r["method"].replace("kvpress ", "").replace("zipvl ", ""),
                (100 * r["kv_vs_bf16_model"], r["ppl"]),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), loc="upper right")
        dense = next(r for r in data["rows"] if r["family"] == "dense")
        ax.axhline(dense["ppl"], color="black", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("KV bytes after prefill + continuation, % of a bf16 cache (fp32 tensors counted as bf16)")
        ax.set_ylabel("continuation perplexity (log scale)")
        ax.set_title(f"{data['model']}: {data['context']} + {data['continuation']} tokens, CPU fp32")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    """Run every method on one model, write the JSON and print the table; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a .gguf file or HF directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--only", nargs="*", help="run only the methods whose name contains one of these")
    parser.add_argument("--plot", help="write the perplexity-vs-KV-bytes figure here after the run")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load(args.model)
    ids = corpus_ids(tokenizer, args.context + args.continuation)
    label = pathlib.Path(args.model).stem if args.model else "SmolLM2-135M-Instruct"
    dense, rows, warm = None, [], set()
    for name, family, params in methods():
        if dense is not None and args.only and not any(key in name for key in args.only):
            continue
        start = time.perf_counter()
        try:
            if params.get("backend", family) not in warm:  # first use: imports, extension builds, allocator
                warm.add(params.get("backend", family))
                run_method(model, ids[:, :72], 64, family, params)
            res = run_method(model, ids, args.context, family, params)
        except Exception as error:  # a peer that cannot run here is reported, not dropped
            rows.append(
                {
                    "method": name,
                    "family": family,
                    "params": params,
                    "version": version(params.get("backend", family)),
                    "error": f"{type(error).__name__}: {error}",
                }
            )
            print(name, "FAILED", rows[-1]["error"], flush=True)
            continue
        if dense is None:
            dense, bf16_bytes = res, cache_nbytes(res["cache"], as_bf16=True)
        rows.append(row(name, family, params, res, dense, bf16_bytes, args.continuation))
        res["cache"] = None
        print(
            name,
            {k: v for k, v in rows[-1].items() if k != "params"},
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    print(markdown(rows))
    print(
        f"model: {label}; context {args.context}, continuation {args.continuation}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"peers_{label}.json"
    out.write_text(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "device": "CPU",
                "torch": torch.__version__,
                "transformers": importlib.metadata.version("transformers"),
                "threads": torch.get_num_threads(),
                "model": label,
                "context": args.context,
                "continuation": args.continuation,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    if args.plot:
        plot(args.plot)


if __name__ == "__main__":
    main()
