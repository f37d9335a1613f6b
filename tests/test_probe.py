"""Probe scoring: the Triton kernels against the plain-torch reference (interpreter on CPU)."""

import math
import zlib

import pytest
import torch
from conftest import DEVICE

from zipvl_compile.runtime.kernels import probe
from zipvl_compile.runtime.kernels.probe import (
    DEFAULT_TILES,
    ProbeArgs,
    ProbeTiles,
    probe_colsum,
    probe_colsum_reference,
    probe_colsum_tiled,
    probe_colsum_triton,
    probe_seen,
)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# (batch, kv heads, n_rep, probe rows m, keys n, head dim d); with the default tiles (128 keys, 128 score rows
# = (probe, head) pairs) n_rep * m spans one or several row tiles; n is never a multiple of a key tile.
CASES = [
    (2, 2, 1, 40, 150, 16),  # MHA, m below the 128-row block
    (2, 2, 1, 140, 300, 64),  # MHA, m above the tile, 2 key splits
    (2, 2, 2, 70, 130, 64),  # GQA 2: 2 row tiles
    (2, 1, 4, 20, 97, 16),  # MQA, 4 query heads
    (1, 2, 4, 9, 70, 64),  # GQA 4, 36 score rows
    (2, 2, 7, 21, 90, 16),  # GQA 7, 147 score rows: 2 row tiles
]


def _inputs(case: tuple, dtype: torch.dtype, seed: int) -> tuple:
    """Random q/k, probes at random positions (some -1, one inside row 1's padding), left padding."""
    batch, n_kv, n_rep, m, n, d = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_kv * n_rep, m, d, generator=g)
    k = torch.randn(batch, n_kv, n, d, generator=g)
    key_valid = torch.ones(batch, n, dtype=torch.bool)
    key_valid[-1, : n // 5] = False
    pos = torch.randint(0, n, (batch, m), generator=g)
    pos[:, -1] = n - 1
    pos[0, 1] = -1
    pos[-1, 0] = n // 10  # sees only padding keys: contributes nothing
    pos[-1, m // 2] = -1
    return (q.to(dtype).to(DEVICE), k.to(dtype).to(DEVICE), pos.to(DEVICE), key_valid.to(DEVICE), d**-0.5, n_rep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case: tuple, dtype: torch.dtype) -> None:
    args = _inputs(case, dtype, seed=zlib.crc32(repr((case, dtype)).encode()))
    colsum, seen = probe_colsum_triton(*args)
    ref_colsum, ref_seen = probe_colsum_reference(*args)
    assert colsum.dtype == seen.dtype == torch.float32
    assert colsum.shape == seen.shape == (case[0], case[4])
    torch.testing.assert_close(colsum, ref_colsum, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen, ref_seen, rtol=0, atol=0)
    # each (head, probe row) that sees a key spreads exactly one unit of mass
    pos, key_valid = args[2], args[3]
    first_valid = key_valid.to(torch.int64).argmax(dim=-1, keepdim=True)
    rows_seeing = ((pos >= first_valid) & (pos >= 0)).sum(dim=-1) * args[0].shape[1]
    torch.testing.assert_close(colsum.sum(dim=-1), rows_seeing.to(torch.float32), rtol=1e-5, atol=0)
    assert (colsum[~key_valid] == 0).all() and (seen[~key_valid] == 0).all()


SMALL = ProbeTiles(rows=16, block_n=16)


@pytest.mark.parametrize("case", [(1, 2, 2, 20, 75, 16), CASES[5]])
def test_kernel_small_tiles(case: tuple) -> None:
    """16-key / 16-row tiles: many key splits and row tiles, partial last tiles everywhere."""
    args = _inputs(case, torch.float16, seed=zlib.crc32(repr(case).encode()))
    colsum, _ = probe_colsum_tiled(ProbeArgs(*args), SMALL)
    torch.testing.assert_close(colsum, probe_colsum_reference(*args)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unmasked_tiles(dtype: torch.dtype) -> None:
    """Probes near the end (as the recent probes are) over left padding: most key tiles of a split run the
    unmasked path, the padding and the causal edge the masked one; ties in the probe positions."""
    batch, n_kv, n_rep, m, n, d = 2, 2, 3, 12, 300, 16
    g = torch.Generator().manual_seed(31)
    q = torch.randn(batch, n_kv * n_rep, m, d, generator=g).to(dtype)
    k = torch.randn(batch, n_kv, n, d, generator=g).to(dtype)
    key_valid = torch.ones(batch, n, dtype=torch.bool)
    key_valid[1, :53] = False
    pos = torch.randint(n - 40, n, (batch, m), generator=g)
    pos[:, 1] = pos[:, 0]  # tied positions
    pos[0, 2] = 70  # one early probe: its row tile has a long masked run
    args = tuple(t.to(DEVICE) for t in (q, k, pos, key_valid)) + (d**-0.5, n_rep)
    ref_colsum, ref_seen = probe_colsum_reference(*args)
    for tiles in (SMALL, ProbeTiles(rows=32, block_n=32, programs_per_sm=1), ProbeTiles(rows=16, block_n=64)):
        colsum, seen = probe_colsum_tiled(ProbeArgs(*args), tiles)
        torch.testing.assert_close(colsum, ref_colsum, rtol=1e-4, atol=1e-5)
        assert torch.equal(seen, ref_seen)


def test_fewer_keys_than_probes() -> None:
    """n below the probe count: probe slots beyond the valid positions are -1, positions repeat."""
    batch, n_kv, n_rep, m, n, d = 2, 1, 2, 40, 13, 16
    g = torch.Generator().manual_seed(2)
    q = torch.randn(batch, n_kv * n_rep, m, d, generator=g)
    k = torch.randn(batch, n_kv, n, d, generator=g)
    key_valid = torch.ones(batch, n, dtype=torch.bool)
    key_valid[1, :4] = False
    pos = torch.randint(0, n, (batch, m), generator=g)
    pos[:, n:] = -1
    args = tuple(t.to(DEVICE) for t in (q, k, pos, key_valid)) + (d**-0.5, n_rep)
    for tiles in (DEFAULT_TILES, SMALL):
        colsum, seen = probe_colsum_tiled(ProbeArgs(*args), tiles)
        ref_colsum, ref_seen = probe_colsum_reference(*args)
        torch.testing.assert_close(colsum, ref_colsum, rtol=1e-4, atol=1e-5)
        assert torch.equal(seen, ref_seen)


@pytest.mark.parametrize("sms", [1, 1000])
def test_split_count_follows_sm_count(sms: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """One key split per row tile (1 SM) up to one split per 2 key tiles (many SMs): the same result."""
    monkeypatch.setattr(probe, "sm_count", lambda device: sms)
    args = _inputs((1, 2, 2, 20, 100, 16), torch.float32, seed=sms)
    colsum, seen = probe_colsum_tiled(ProbeArgs(*args), SMALL)
    ref_colsum, ref_seen = probe_colsum_reference(*args)
    torch.testing.assert_close(colsum, ref_colsum, rtol=1e-4, atol=1e-5)
    assert torch.equal(seen, ref_seen)


def test_stages_apart() -> None:
    """probe_lse gives the reference's base-2 log-sum-exp per score row (probe-major rows)."""
    args = _inputs(CASES[3], torch.float32, seed=9)
    q, k, pos, key_valid, scale, n_rep = args
    lse = probe.probe_lse(probe.ProbeArgs(*args), SMALL)
    batch, n_q, m, _ = q.shape
    scores = torch.matmul(q, k.repeat_interleave(n_rep, dim=1).transpose(-1, -2)) * scale
    visible = (torch.arange(k.shape[2], device=k.device) <= pos[:, :, None]) & key_valid[:, None, :]
    ref = torch.logsumexp(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1) / math.log(2)
    ref = ref.masked_fill(~visible.any(dim=-1)[:, None], float("inf"))
    # [B, Hq, m] -> [B, Hkv, m * n_rep] with row r = (probe r // n_rep, head r % n_rep)
    ref = ref.view(batch, n_q // n_rep, n_rep, m).transpose(2, 3).reshape(batch, n_q // n_rep, m * n_rep)
    torch.testing.assert_close(lse, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lse"):
        probe.probe_colsum_from_lse(probe.ProbeArgs(*args), lse[..., 1:])


def test_bad_tiles() -> None:
    with pytest.raises(ValueError, match="rows"):
        ProbeTiles(rows=24)
    with pytest.raises(ValueError, match="lse_warps"):
        ProbeTiles(lse_warps=0)
    with pytest.raises(ValueError, match="heads"):
        probe_colsum_triton(*_inputs(CASES[3], torch.float32, seed=1)[:5], 3)


def test_kernel_is_deterministic() -> None:
    args = _inputs(CASES[3], torch.float32, seed=11)
    first = probe_colsum_triton(*args)
    again = probe_colsum_triton(*args)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_seen_closed_form() -> None:
    g = torch.Generator().manual_seed(5)
    n, m = 57, 13
    pos = torch.randint(-1, n, (3, m), generator=g)
    key_valid = torch.rand(3, n, generator=g) > 0.2
    brute = ((pos[:, :, None] >= torch.arange(n)[None, None, :]).sum(dim=1) * key_valid).to(torch.float32)
    assert torch.equal(probe_seen(pos, key_valid), brute)


@pytest.mark.parametrize("use_triton", [False, True])
def test_planted_keys_dominate(use_triton: bool) -> None:
    """Keys aligned with a direction every query shares take almost all the mass."""
    batch, n_kv, n_rep, m, n, d = 2, 2, 2, 24, 120, 64
    g = torch.Generator().manual_seed(23)
    shared = torch.zeros(d)
    shared[0] = 4.0
    q = 0.5 * torch.randn(batch, n_kv * n_rep, m, d, generator=g) + shared
    k = torch.randn(batch, n_kv, n, d, generator=g)
    planted = torch.tensor([30, 41, 77])
    k[:, :, planted, 0] = 20.0
    key_valid = torch.ones(batch, n, dtype=torch.bool)
    key_valid[1, :25] = False
    pos = torch.sort(torch.randint(80, n, (batch, m), generator=g), dim=-1).values
    q, k, pos, key_valid = (t.to(DEVICE) for t in (q, k, pos, key_valid))
    colsum, _ = probe_colsum(q, k, pos, key_valid, d**-0.5, n_rep, use_triton=use_triton)
    colsum = colsum.cpu()
    top = colsum.topk(3, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(top, planted.expand(batch, 3))
    assert (colsum[:, planted].sum(dim=-1) > 0.95 * n_kv * n_rep * m).all()


def test_dispatcher() -> None:
    args = _inputs(CASES[3], torch.float32, seed=3)
    ref = probe_colsum_reference(*args)
    for use_triton, expected in (
        (None, ref if DEVICE == "cpu" else probe_colsum_triton(*args)),
        (False, ref),
        (True, probe_colsum_triton(*args)),
    ):
        out = probe_colsum(*args, use_triton=use_triton)
        assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES + [(1, 4, 7, 128, 4100, 128)])
def test_kernel_bf16_gpu(case: tuple) -> None:
    args = _inputs(case, torch.bfloat16, seed=7)
    colsum, seen = probe_colsum_triton(*args)
    ref_colsum, ref_seen = probe_colsum_reference(*args)
    torch.testing.assert_close(colsum, ref_colsum, rtol=1e-3, atol=1e-4)
    assert torch.equal(seen, ref_seen)


def test_bench_sweep_smoke(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The ``--sweep-probe`` path of bench.prefill_attention end to end at a tiny size (two configurations of
    each grid, one call per timing): every stage has rows, every configuration matches the default and the
    selection its reference."""
    import json

    from bench import prefill_attention as bench

    for grid in ("_probe_grid", "_sink_grid"):
        configs = getattr(bench, grid)()
        monkeypatch.setattr(bench, grid, lambda configs=configs: dict(list(configs.items())[:2]))
    select_grid, kept = bench._select_grid, ("policy", "split_p16_b256_d4_w4")  # a split launch among them
    monkeypatch.setattr(bench, "_select_grid", lambda *args: {k: v for k, v in select_grid(*args).items() if k in kept})
    monkeypatch.setattr(bench, "median_ms", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setenv("OUT", str(tmp_path))
    rows = bench.main(["--sweep-probe", "--smoke", "--lengths", "64", "--shapes", "tiny-gqa", "--sink-window", "8"])
    stages = ("probe_pass1", "probe_pass2", "select", "merge")
    assert {row["stage"] for row in rows} == set(stages)
    assert len(rows) == 8 and all(row["matches_default"] and not row["errors"] for row in rows)
    payload = json.loads((tmp_path / "prefill_probe_sweep.json").read_text())
    assert len(payload["rows"]) == 8 and set(payload["best"]) == {f"tiny-gqa/64/{s}" for s in stages}
