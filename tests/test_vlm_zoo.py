"""Every image-text-to-text class of transformers 5.17 that builds from a tiny config (tests/vlm_zoo.py): greedy
tokens identical to the uncompiled model at tau = 1 with 16/16 bits, and decoder sites rewritten.

Models run in groups, one test per group; a group reports every model that failed, not only the first.
"""

from __future__ import annotations

import pytest
import torch
from vlm_zoo import build_zoo, compile_target, zoo_groups

import zipvl_compile

EXACT = {"tau": 1.0, "hi_bits": 16, "lo_bits": 16, "inner": "eager"}
GEN = dict(max_new_tokens=2, do_sample=False)


def _problems(name: str) -> list[str]:
    """What is wrong with model ``name`` compiled by zipvl (empty when nothing is)."""
    model, inputs = build_zoo(name)
    with torch.no_grad():
        expected = model.generate(**inputs, **GEN)
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    target = compile_target(model)
    target.forward = torch.compile(target.forward, backend="zipvl", options=EXACT)
    with torch.no_grad():
        got = model.generate(**inputs, **GEN)
    rep = zipvl_compile.report()
    problems = [] if torch.equal(got, expected) else [f"tokens differ: {got.tolist()} vs {expected.tolist()}"]
    if not any(s.rewritten and s.kind in ("prefill", "decode") for s in rep.sites):
        problems.append("no decoder site rewritten")
    for s in rep.sites:
        if not s.rewritten and not s.reason:
            problems.append(f"{s.module_path} left alone without a reason")
        cached = s.kv_write not in (None, "none") and s.kind != "cross"
        if s.kind == "encoder" and (cached or (s.mask or "").startswith("causal")):
            problems.append(f"{s.module_path} called an encoder despite a causal mask or a KV-cache write")
    return [f"{name}: {p}\n{rep}" for p in problems]


@pytest.mark.slow
@pytest.mark.parametrize("names", zoo_groups(10), ids=lambda names: f"{names[0]}..{names[-1]}")
def test_zoo_tokens_identical_and_decoder_rewritten(names):
    problems = [p for name in names for p in _problems(name)]
    assert not problems, "\n".join(problems)
