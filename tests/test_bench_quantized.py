"""bench.decode's transformers QuantizedCache methods on the CPU (bytes held, tokens produced, skipped rows),
bench.breakdown's smoke runs, bench.decode_attention's tuning grid, and the bench folder's module names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from bench import decode

BATCH, PROMPT, WARMUP, STEPS = 2, 128, 1, 3
GROUP = 64  # transformers' default q_group_size: one scale and one zero point per group


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.LlamaForCausalLM._from_config(
        T.LlamaConfig(**decode.TINY), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


@pytest.mark.parametrize("name", list(decode.QUANTIZED))
def test_quantized_method_decodes_and_holds_its_packed_bytes(model, name):
    pytest.importorskip("optimum.quanto" if "quanto" in name else "hqq.core.quantize")
    nbits = int(name[-1])
    cfg = model.config
    ids = torch.randint(3, cfg.vocab_size, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    res = decode.METHODS[name](model, ids, WARMUP, STEPS)

    assert res["tokens"].shape == (BATCH, STEPS) and res["tokens"].dtype == torch.long
    assert 0 <= res["tokens"].min() and res["tokens"].max() < cfg.vocab_size
    assert res["seconds"] > 0
    # K and V over the layers, per token: the prompt is quantised, the decode tokens sit in the fp32 residual
    per_token = 2 * cfg.num_hidden_layers * BATCH * cfg.num_key_value_heads * cfg.head_dim
    codes = PROMPT * per_token * nbits // 8
    scales = PROMPT * per_token // GROUP * 2 * 4  # fp32 scale and zero point per group
    residual = (WARMUP + STEPS) * per_token * 4
    assert res["kv_bytes"] == codes + scales + residual
    static_bf16 = (PROMPT + WARMUP + STEPS + 1) * per_token * 2  # the static cache run_hf_static_compiled holds
    assert res["kv_bytes"] < static_bf16


def test_failing_backend_gets_a_skipped_row_reused_by_later_rows(monkeypatch):
    calls = []

    def missing(*args):
        calls.append(args)
        raise ImportError("no module named hqq\nsecond line")

    name = "hf_quantized_hqq2"
    monkeypatch.setitem(decode.METHODS, name, missing)
    (row,) = decode.main(["--smoke", "--methods", name])
    assert row[f"{name}_tok_s"].startswith("skipped: ImportError: no module named hqq (hqq ")
    assert f"{name}_kv_mb" not in row
    skipped = {}
    first = decode.measure(name, None, torch.zeros(1, 1), WARMUP, STEPS, skipped)
    again = decode.measure(name, None, torch.zeros(1, 1), WARMUP, STEPS, skipped)
    assert first == again == {f"{name}_tok_s": row[f"{name}_tok_s"]} and len(calls) == 2  # main's, then measure's


def test_out_of_memory_is_retried_and_other_methods_still_raise(monkeypatch):
    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setitem(decode.METHODS, "hf_quantized_quanto4", oom)
    skipped = {}
    cell = decode.measure("hf_quantized_quanto4", None, torch.zeros(1, 1), WARMUP, STEPS, skipped)
    assert cell["hf_quantized_quanto4_tok_s"].startswith("skipped: OutOfMemoryError: CUDA out of memory")
    assert skipped == {}  # a larger row may fail where a smaller one fits: not remembered
    monkeypatch.setitem(decode.METHODS, "hf_eager", oom)
    with pytest.raises(torch.OutOfMemoryError):
        decode.measure("hf_eager", None, torch.zeros(1, 1), WARMUP, STEPS, skipped)


@pytest.mark.parametrize(
    ("what", "methods"), [("decode", ("static", "zipvl")), ("prefill", ("hf", "zipvl")), ("op", ("dense", "zipvl"))]
)
def test_breakdown_smoke(monkeypatch, tmp_path, what, methods):
    """bench.breakdown on the tiny CPU models: both methods run, are timed and profiled on the host, and the figures
    reach $OUT; a method of another mode is refused."""
    from bench import breakdown

    monkeypatch.setenv("OUT", str(tmp_path))
    result = breakdown.main([what, "--smoke", "--steps", "2", "--warmup", "1", "--top", "5"])
    for name in methods:
        assert result[name]["wall_ms_per_step"] > 0
        assert "function calls" in result[name]["host"]  # cProfile's header: the host profile ran
    assert (tmp_path / f"breakdown_{what}.json").exists()
    with pytest.raises(SystemExit):
        breakdown.main([what, "--smoke", "--methods", "hf" if what == "decode" else "static"])


def test_no_bench_module_shadows_the_standard_library() -> None:
    """``python bench/<script>.py`` puts bench/ first on sys.path: a bench/select.py was imported for the standard
    library's ``select`` (by ``subprocess``) and broke every script run that way."""
    names = {path.stem for path in (Path(__file__).parents[1] / "bench").glob("*.py")}
    assert len(names) > 5 and not names & set(sys.stdlib_module_names)


@pytest.mark.parametrize("n_rep", [1, 3])
def test_decode_attention_variants_match_the_policy(n_rep):
    """bench/decode_attention.py's --variants: every knob set names every field of the path's tuning, and the
    split-bound variants (split counts from the bounds) give the policy's output."""
    from bench import decode_attention as bench_da
    from zipvl_compile.runtime.kernels import decode as dec

    grid = bench_da.variants_for(n_rep)
    assert all(set(dec.Tuning._fields) <= set(knobs) for knobs in grid)
    B, H, n = 2, 2, 512
    case = bench_da.make_cache(B, H, n_rep, n, 32, "cpu", torch.Generator().manual_seed(0))
    q, call = case["q"], dec.DecodeCall(**{name: value for name, value in case.items() if name != "q"})
    policy = dec.decode_attention_triton(q, call)
    policy_bounds = lambda path: (dec.tuning(path).min_blocks, dec.tuning(path).max_splits)
    bounds = [k for k in grid if (k["min_blocks"], k["max_splits"]) != policy_bounds(k["path"])]
    assert bounds
    for knobs in bounds:
        out = bench_da.variant_launch(q, call, (B, H, n), 132, knobs)()
        torch.testing.assert_close(out, policy, atol=2e-5, rtol=2e-5)
