"""KV memory: a LLaVA-Next-7B-shaped decoder (Llama, 32 layers, MHA 32 x 128), bf16, random weights.

    python -m bench.memory [--prompt 32768] [--new 256] [--ratio 0.5]

Same run, same prompt: HF ``generate`` with its default DynamicCache (bf16 KV), then the same model through
``zipvl_compile.compile`` (packed 4/2-bit ZipVLCache; ``force_ratio`` fixes the kept ratio because random
weights have no sparse structure; ``inner="eager"`` to keep compile time out of a short device lease).
Reported: peak GPU memory during generate, KV bytes held (all cache buffers) vs a bf16 cache of the same
tokens, wall time. Writes $OUT/memory.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
import transformers as T

from bench._timing import device_name, write_json

LLAVA_NEXT_7B_TEXT = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=65536,
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=4096,
)


def _generate(model, ids, new: int) -> tuple[float, float | None, object]:
    if ids.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            return_dict_in_generate=True,
        )
    if ids.is_cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if ids.is_cuda else None
    return time.perf_counter() - start, peak, out.past_key_values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()
    import zipvl_compile

    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    prompt, new = (300, 8) if args.smoke else (args.prompt, args.new)
    torch.manual_seed(0)
    with torch.device(device):
        model = T.LlamaForCausalLM._from_config(
            T.LlamaConfig(**(TINY if args.smoke else LLAVA_NEXT_7B_TEXT)), dtype=dtype, attn_implementation="sdpa"
        ).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), device=device)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    hf_s, hf_peak, hf_cache = _generate(model, ids, new)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_dense = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (prompt + new) * head_dim * 2
    del hf_cache
    zipvl_compile.compile(model, tau=0.975, force_ratio=args.ratio, dense_below=0, hi_bits=4, lo_bits=2, inner="eager")
    zipvl_compile.reset_report()
    _generate(model, ids, 2)  # compile the prefill and decode graphs outside the measurement
    zipvl_compile.reset_report()
    zv_s, zv_peak, _ = _generate(model, ids, new)
    rep = zipvl_compile.report()
    row = {
        "prompt": prompt,
        "new": new,
        "kept_ratio": args.ratio,
        "weights_mb": round(weights_mb),
        "hf_peak_mb": hf_peak,
        "zipvl_peak_mb": zv_peak,
        "hf_kv_bf16_mb": kv_dense / 2**20,
        "zipvl_kv_mb": rep.kv_bytes / 2**20,
        "zipvl_kv_vs_bf16": rep.kv_bytes / rep.kv_bytes_dense,
        "hf_generate_s": hf_s,
        "zipvl_generate_s": zv_s,
        "peak_reduction": None if hf_peak is None else 1 - zv_peak / hf_peak,
    }
    print(row)
    print(rep)
    write_json(
        "memory.json",
        {"date": datetime.date.today().isoformat(), "device": device_name(), "torch": torch.__version__, "row": row},
    )


if __name__ == "__main__":
    main()
