"""``zipvl-demo``: compile a decoder with the zipvl backend, generate, and print the compile report."""

from __future__ import annotations

import argparse
import sys

import torch


def _tiny_llama() -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return T.LlamaForCausalLM(cfg).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zipvl-demo", description=__doc__)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    import zipvl_compile

    model = _tiny_llama()
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        model.forward = torch.compile(model.forward, backend="zipvl", options={"tau": args.tau, "inner": "eager"})
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print("dense tokens: ", dense[0, ids.shape[1]:].tolist())
    print("zipvl tokens: ", out[0, ids.shape[1]:].tolist())
    print(zipvl_compile.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
