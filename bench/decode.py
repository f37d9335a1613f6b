"""End-to-end decode throughput on a ~1B-parameter Llama-shaped model (Llama-3.2-1B shapes, random bf16 weights).

    python -m bench.decode [--contexts 8192 32768] [--batches 1 8] [--steps 120] [--methods NAME ...]
    python -m bench.decode --smoke    # tiny model on the CPU: exercises every path, times nothing meaningful

Per (context, batch), same weights and prompt, one run, these ways of generating greedily (``--methods`` picks some):
- ``hf_eager``: the model's forward with transformers' DynamicCache, one call per token;
- ``hf_quantized_{quanto,hqq}{4,2}``: the same eager loop with transformers' ``QuantizedCache`` (the bench extra's
  optimum-quanto or HQQ backend at 4 or 2 bits, transformers' defaults otherwise: groups of 64, axis 0, a
  ``residual_length`` of 128). Its layers hold the prompt quantised and the latest decode tokens in the model's
  dtype, dequantise everything at every step and re-quantise it all at the 128th decode step (127 tokens in the
  residual): the default 4 + 120 steps time no re-quantisation, ``--steps 124`` or more time one. The cache is not
  compileable (quantised tensor subclasses, a length that grows every step), so it runs eager. quanto on CUDA
  JIT-builds its extension (nvcc, ninja) on first use, inside the warmup. A backend whose package is missing, or
  that fails, gets ``skipped: <error>`` in its tokens/s column, and later rows reuse that reason (out of memory
  excepted) rather than retrying it;
- ``hf_static_compiled``: StaticCache + ``torch.compile(forward, mode="reduce-overhead", fullgraph=True)``,
  transformers' recommended fast decode (the strongest stock baseline);
- ``zipvl``: the packed 4/2-bit ZipVLCache, decode compiled by the zipvl backend (Inductor, CUDA graphs).
  Random weights have no sparse structure, so the prefill keeps a fixed half of the tokens
  (``force_ratio=0.5``, benchmark-only) and is compiled apart with ``inner="eager"``: it only fills the cache
  here, and its Inductor compile would spend the device lease on something this benchmark does not time.
Each method prefills the prompt, runs ``--warmup`` decode steps (compilation, CUDA-graph recording), then
``--steps`` timed steps feeding back its own greedy tokens (120 steps cross one recompression of the zipvl tail).
Reported: decode tokens/s = batch x steps / wall time (CUDA-synchronised), and the KV bytes each cache holds after
the last step, counted by :func:`bench.peers.cache_nbytes` over every tensor of every layer: a QuantizedCache's
residual ``keys``/``values`` (model dtype) plus its quantised keys and values, i.e. quanto's packed uint8 codes,
scale and shift (through the QTensor's ``__tensor_flatten__``) or HQQ's uint8 codes with the scale and zero tensors
of its meta dict.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import time
from collections.abc import Callable

import torch
import transformers as T

import zipvl_compile
from bench._timing import device_name, markdown_table, write_json
from bench.peers import cache_nbytes, version

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
ZIPVL = dict(hi_bits=4, lo_bits=2, force_ratio=0.5, dense_below=0)  # the r = 0.5 split at every context


def build_model(smoke: bool = False) -> T.LlamaForCausalLM:
    """The benchmark's model, random weights (seed 0): Llama-3.2-1B shapes in bf16 on CUDA, or (``smoke``) a tiny
    fp32 one on the CPU."""
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    with torch.device(device):
        config = T.LlamaConfig(**(TINY if smoke else LLAMA_1B))
        return T.LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


def prompt(model: T.PreTrainedModel, batch: int, n: int) -> torch.Tensor:
    """Random prompt ids [batch, n] on the model's device, seeded by (n, batch)."""
    device = model.device.type
    generator = torch.Generator(device).manual_seed(n + batch)
    return torch.randint(3, model.config.vocab_size, (batch, n), device=device, generator=generator)


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


def _run_eager(model, ids: torch.Tensor, cache: T.Cache, warmup: int, steps: int) -> dict:
    """Prefill ``ids`` [B, n] into ``cache``, then decode greedily with the model's eager forward, one call a token."""
    with torch.no_grad():
        first = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        step = lambda tok, pos: model(input_ids=tok, past_key_values=cache).logits[:, -1]
        seconds, tokens = _decode(step, first, ids.shape[1], warmup, steps, ids.device.type)
    return dict(seconds=seconds, tokens=tokens, kv_bytes=cache_nbytes(cache))


def run_hf_eager(model, ids: torch.Tensor, warmup: int, steps: int) -> dict:
    return _run_eager(model, ids, T.DynamicCache(config=model.config), warmup, steps)


def run_hf_quantized(model, ids: torch.Tensor, warmup: int, steps: int, backend: str, nbits: int) -> dict:
    """:func:`run_hf_eager` with ``QuantizedCache(backend=backend, nbits=nbits)`` ("quanto" or "hqq")."""
    return _run_eager(model, ids, T.QuantizedCache(backend=backend, config=model.config, nbits=nbits), warmup, steps)


def static_stepper(model, ids: torch.Tensor, total: int) -> tuple[torch.Tensor, Callable, T.Cache]:
    """HF StaticCache + ``torch.compile(mode="reduce-overhead")``: prefill ``ids`` [B, n]; returns (first tokens
    [B, 1], step(tokens, pos) -> logits [B, vocab], cache) for ``total`` cached tokens at most."""
    n = ids.shape[1]
    cache = T.StaticCache(config=model.config, max_cache_len=total)
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    positions = torch.arange(total, device=ids.device)
    with torch.no_grad():
        first = model(input_ids=ids, past_key_values=cache, cache_position=positions[:n], logits_to_keep=1)
    step = lambda tok, pos: (
        forward(input_ids=tok, past_key_values=cache, cache_position=positions[pos : pos + 1]).logits[:, -1].clone()
    )
    return first.logits[:, -1].argmax(-1, keepdim=True), step, cache


def run_hf_static_compiled(model, ids: torch.Tensor, warmup: int, steps: int) -> dict:
    first, step, cache = static_stepper(model, ids, ids.shape[1] + warmup + steps + 1)
    with torch.no_grad():
        seconds, tokens = _decode(step, first, ids.shape[1], warmup, steps, ids.device.type)
    return dict(seconds=seconds, tokens=tokens, kv_bytes=cache_nbytes(cache))


def zipvl_stepper(model, ids: torch.Tensor, total: int) -> tuple[torch.Tensor, Callable, T.Cache]:
    """The packed ZipVLCache (:data:`ZIPVL`), decode compiled by the zipvl backend (Inductor + CUDA graphs on CUDA);
    returns what :func:`static_stepper` does."""
    cache = zipvl_compile.ZipVLCache(model, max_cache_len=total, **{k: ZIPVL[k] for k in ("hi_bits", "lo_bits")})
    prefill = torch.compile(model.forward, backend="zipvl", options=dict(ZIPVL, inner="eager"))
    graphs = dict(inner="inductor", cudagraphs=True) if ids.is_cuda else dict(inner="eager")  # reduce-overhead
    decode = torch.compile(model.forward, backend="zipvl", options=dict(ZIPVL, **graphs))
    with torch.no_grad():
        first = prefill(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, logits_to_keep=1)
    cache.compact()
    step = lambda tok, pos: decode(input_ids=tok, past_key_values=cache).logits[:, -1].clone()
    return first.logits[:, -1].argmax(-1, keepdim=True), step, cache


def run_zipvl(model, ids: torch.Tensor, warmup: int, steps: int) -> dict:
    first, step, cache = zipvl_stepper(model, ids, ids.shape[1] + warmup + steps + 1)
    with torch.no_grad():
        seconds, tokens = _decode(step, first, ids.shape[1], warmup, steps, ids.device.type)
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


QUANTIZED = {
    f"hf_quantized_{backend}{nbits}": functools.partial(run_hf_quantized, backend=backend, nbits=nbits)
    for backend in ("quanto", "hqq")
    for nbits in (4, 2)
}
METHODS = {"hf_eager": run_hf_eager, **QUANTIZED, "hf_static_compiled": run_hf_static_compiled, "zipvl": run_zipvl}


def skip_reason(name: str, error: Exception) -> str:
    """The tokens/s cell of a QuantizedCache method that raised ``error``: the error's first line and the version of
    the backend's package."""
    backend = QUANTIZED[name].keywords["backend"]
    first_line = (str(error).strip().splitlines() or [""])[0][:200].replace("|", "/")  # a markdown table cell
    return f"skipped: {type(error).__name__}: {first_line} ({version(backend)})"


def measure(
    name: str, model: torch.nn.Module, ids: torch.Tensor, warmup: int, steps: int, skipped: dict[str, str]
) -> dict:
    """One method's entries of a table row: ``{name}_tok_s``, ``{name}_kv_mb`` and its extras. A QuantizedCache
    method that raises gets its :func:`skip_reason` as ``{name}_tok_s`` instead, recorded in ``skipped`` (method ->
    reason, out of memory excepted) so that later rows reuse it rather than run it again."""
    if name in skipped:
        return {f"{name}_tok_s": skipped[name]}
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    batch = ids.shape[0]
    try:
        res = METHODS[name](model, ids, warmup, steps)
    except Exception as error:
        if name not in QUANTIZED:
            raise
        reason = skip_reason(name, error)
        if not isinstance(error, torch.OutOfMemoryError):
            skipped[name] = reason
        return {f"{name}_tok_s": reason}
    extras = {f"{name}_{k}": v for k, v in res.items() if k not in ("seconds", "tokens", "kv_bytes")}
    return {f"{name}_tok_s": batch * steps / res["seconds"], f"{name}_kv_mb": res["kv_bytes"] / 2**20, **extras}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark (arguments as on the command line); returns the table's rows."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    contexts, batches, steps = ([200], [2], 6) if args.smoke else (args.contexts, args.batches, args.steps)
    model = build_model(args.smoke)
    params = sum(p.numel() for p in model.parameters())
    rows, skipped = [], {}  # skipped: method -> the reason its earlier failure gave
    for n in contexts:
        for batch in batches:
            ids = prompt(model, batch, n)
            row = {"context": n, "batch": batch}
            for name in args.methods:
                began = time.perf_counter()
                row.update(measure(name, model, ids, args.warmup, steps, skipped))
                cell = row[f"{name}_tok_s"]
                print(name, n, batch, f"{cell:.1f} tok/s" if isinstance(cell, float) else cell, end=" ")
                print(f"{time.perf_counter() - began:.0f} s", flush=True)
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
    return rows


if __name__ == "__main__":
    main()
