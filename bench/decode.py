"""End-to-end decode throughput on a ~1B-parameter Llama-shaped model (Llama-3.2-1B shapes, random bf16 weights).

    python -m bench.decode [--contexts 8192 32768] [--batches 1 8] [--steps 120]
    python -m bench.decode --smoke    # tiny model on the CPU: exercises every path, times nothing meaningful

Per (context, batch), same weights and prompt, one run, three ways of generating greedily:
- ``hf_eager``: the model's forward with transformers' DynamicCache, one call per token;
- ``hf_static_compiled``: StaticCache + ``torch.compile(forward, mode="reduce-overhead", fullgraph=True)``,
  transformers' recommended fast decode (the strongest stock baseline);
- ``zipvl``: the packed 4/2-bit ZipVLCache, decode compiled by the zipvl backend (Inductor, CUDA graphs).
  Random weights have no sparse structure, so the prefill keeps a fixed half of the tokens
  (``force_ratio=0.5``, benchmark-only) and is compiled apart with ``inner="eager"``: it only fills the cache
  here, and its Inductor compile would spend the device lease on something this benchmark does not time.
Each method prefills the prompt, runs ``--warmup`` decode steps (compilation, CUDA-graph recording), then
``--steps`` timed steps feeding back its own greedy tokens (120 steps cross one recompression of the zipvl tail).
Reported: decode tokens/s = batch x steps / wall time (CUDA-synchronised), and the KV bytes each cache holds.
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Callable

import torch
import transformers as T

from bench._timing import device_name, markdown_table, write_json
from bench.peers import cache_nbytes

LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=140000,
    tie_word_embeddings=True,
)
TINY = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)
ZIPVL = dict(hi_bits=4, lo_bits=2, force_ratio=0.5)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _decode(
    step: Callable[[torch.Tensor, int], torch.Tensor],
    first: torch.Tensor,
    start: int,
    warmup: int,
    steps: int,
    device: str,
) -> tuple[float, torch.Tensor]:
    """Run ``warmup`` untimed then ``steps`` timed greedy steps; returns (seconds, tokens [B, steps])."""
    token, pos, out = first, start, []
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            began = time.perf_counter()
        token = step(token, pos).argmax(-1, keepdim=True)
        pos += 1
        if i >= warmup:
            out.append(token)
    _sync(device)
    return time.perf_counter() - began, torch.cat(out, dim=1)


def run_hf_eager(model, ids: torch.Tensor, warmup: int, steps: int) -> dict:
    cache = T.DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        step = lambda tok, pos: model(input_ids=tok, past_key_values=cache).logits[:, -1]
        seconds, tokens = _decode(step, first, ids.shape[1], warmup, steps, ids.device.type)
    return dict(seconds=seconds, tokens=tokens, kv_bytes=cache_nbytes(cache))


def run_hf_static_compiled(model, ids: torch.Tensor, warmup: int, steps: int) -> dict:
    batch, n = ids.shape
    cache = T.StaticCache(config=model.config, max_cache_len=n + warmup + steps + 1)
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    positions = torch.arange(n + warmup + steps + 1, device=ids.device)
    with torch.no_grad():
        first = (
            model(input_ids=ids, past_key_values=cache, cache_position=positions[:n], logits_to_keep=1)
            .logits[:, -1]
            .argmax(-1, keepdim=True)
        )
        step = lambda tok, pos: (
            forward(input_ids=tok, past_key_values=cache, cache_position=positions[pos : pos + 1]).logits[:, -1].clone()
        )
        seconds, tokens = _decode(step, first, n, warmup, steps, ids.device.type)
    return dict(seconds=seconds, tokens=tokens, kv_bytes=cache_nbytes(cache))


def run_zipvl(model, ids: torch.Tensor, warmup: int, steps: int) -> dict:
    import zipvl_compile
    from zipvl_compile import ZipVLCache

    n = ids.shape[1]
    cache = ZipVLCache(model, max_cache_len=n + warmup + steps + 1, **{k: ZIPVL[k] for k in ("hi_bits", "lo_bits")})
    prefill = torch.compile(model.forward, backend="zipvl", options=dict(ZIPVL, inner="eager"))
    graphs = dict(inner="inductor", cudagraphs=True) if ids.is_cuda else dict(inner="eager")  # reduce-overhead
    decode = torch.compile(model.forward, backend="zipvl", options=dict(ZIPVL, **graphs))
    with torch.no_grad():
        first = (
            prefill(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, logits_to_keep=1)
            .logits[:, -1]
            .argmax(-1, keepdim=True)
        )
        cache.compact()
        step = lambda tok, pos: decode(input_ids=tok, past_key_values=cache).logits[:, -1].clone()
        seconds, tokens = _decode(step, first, n, warmup, steps, ids.device.type)
    rep = zipvl_compile.report()
    rep.record_cache(cache)
    decode_ops = {s.op for s in rep.sites if s.kind == "decode"}
    return dict(
        seconds=seconds,
        tokens=tokens,
        kv_bytes=cache_nbytes(cache),
        decode_ops=sorted(map(str, decode_ops)),
        cudagraph_graphs=[g.graph_id for g in rep.graphs if g.cudagraphs],
    )


METHODS = {"hf_eager": run_hf_eager, "hf_static_compiled": run_hf_static_compiled, "zipvl": run_zipvl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    import zipvl_compile

    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    contexts, batches, steps = ([200], [2], 6) if args.smoke else (args.contexts, args.batches, args.steps)
    torch.manual_seed(0)
    with torch.device(device):
        model = T.LlamaForCausalLM._from_config(
            T.LlamaConfig(**(TINY if args.smoke else LLAMA_1B)), dtype=dtype, attn_implementation="sdpa"
        ).eval()
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for n in contexts:
        for batch in batches:
            ids = torch.randint(
                3,
                model.config.vocab_size,
                (batch, n),
                device=device,
                generator=torch.Generator(device).manual_seed(n + batch),
            )
            row = {"context": n, "batch": batch}
            for name in args.methods:
                torch._dynamo.reset()
                zipvl_compile.reset_report()
                began = time.perf_counter()
                res = METHODS[name](model, ids, args.warmup, steps)
                row[f"{name}_tok_s"] = batch * steps / res["seconds"]
                row[f"{name}_kv_mb"] = res["kv_bytes"] / 2**20
                row.update({f"{name}_{k}": v for k, v in res.items() if k not in ("seconds", "tokens", "kv_bytes")})
                print(
                    name,
                    n,
                    batch,
                    f"{row[f'{name}_tok_s']:.1f} tok/s",
                    f"{time.perf_counter() - began:.0f} s",
                    flush=True,
                )
                if device == "cuda":
                    torch.cuda.empty_cache()
            for base in ("hf_eager", "hf_static_compiled"):
                if "zipvl_tok_s" in row and f"{base}_tok_s" in row:
                    row[f"zipvl_vs_{base}"] = row["zipvl_tok_s"] / row[f"{base}_tok_s"]
            rows.append(row)
            write_json(
                "decode.json",
                {
                    "date": datetime.date.today().isoformat(),
                    "device": device_name(),
                    "torch": torch.__version__,
                    "params": params,
                    "steps": steps,
                    "rows": rows,
                },
            )
    columns = (
        ["context", "batch"]
        + [f"{m}_tok_s" for m in args.methods]
        + [c for c in ("zipvl_vs_hf_eager", "zipvl_vs_hf_static_compiled") if c in rows[0]]
        + [f"{m}_kv_mb" for m in args.methods]
    )
    print(markdown_table(rows, columns))
    print(f"model: {params / 1e9:.2f}B parameters, {dtype}, {device_name()}")


if __name__ == "__main__":
    main()
