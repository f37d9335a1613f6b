"""Probe choice and kept-set selection (Eqs. 6-8) on planted inputs with known answers."""

import pytest
import torch
from conftest import DEVICE

from zipvl_compile.runtime.kernels.select_reference import _mul32, _random_keys, choose_probes, select_tokens


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _valid(batch: int, n: int, pads: list[tuple[int, int]]) -> torch.Tensor:
    """bool [batch, n]; row b is valid on [pads[b][0], n - pads[b][1])."""
    valid = torch.zeros(batch, n, dtype=torch.bool)
    for row, (left, right) in enumerate(pads):
        valid[row, left : n - right] = True
    return valid.to(DEVICE)


def _naive_select(colsum: torch.Tensor, seen: torch.Tensor, valid: torch.Tensor, tau: float, min_keep: int) -> set[int]:
    """One row of docs/method.md §4-§5, written as a loop (the oracle)."""
    idx = [j for j in range(len(valid)) if valid[j]]
    mass = sorted((float(colsum[j]) for j in idx), reverse=True)
    total, running, p = sum(mass), 0.0, 0
    while p < len(idx) and running < tau * total:
        running += mass[p]
        p += 1
    p = max(p, 1) if idx else 0
    score = {j: float(colsum[j] / seen[j]) if seen[j] > 0 else 0.0 for j in idx}
    by_score = sorted(idx, key=lambda j: (-score[j], j))
    kept = set(by_score[:p]) | ({idx[-1]} if idx else set())
    for j in by_score:
        if len(kept) >= min(min_keep, len(idx)):
            break
        kept.add(j)
    return kept


def _kept(keep: torch.Tensor, row: int) -> set[int]:
    return set(keep[row].nonzero().flatten().tolist())


def test_planted_mass_keeps_exactly_the_heavy_keys() -> None:
    n = 200
    valid = _valid(2, n, [(0, 0), (30, 0)])
    g = _gen(1)
    colsum = 0.5 + torch.rand(2, n, generator=g)
    heavy = torch.stack([torch.randperm(n - 40, generator=g)[:5] + 35 for _ in range(2)])
    light = colsum.clone()
    light.scatter_(-1, heavy, 0.0)
    light = torch.where(valid.cpu(), light, 0.0)
    # the 5 heavy keys hold 97% of the valid mass, 19.4% each
    colsum.scatter_(-1, heavy, (light.sum(-1, keepdim=True) * 0.97 / 0.03 / 5).expand(2, 5))
    colsum[1, :30] = 1e6  # padding with huge mass is never kept
    seen = 1.0 + torch.randint(0, 4, (2, n), generator=g).float()
    keep, ratio = select_tokens(colsum.to(DEVICE), seen.to(DEVICE), valid, tau=0.96, min_keep=0)
    for row in range(2):
        assert _kept(keep, row) == set(heavy[row].tolist()) | {n - 1}
    torch.testing.assert_close(ratio.cpu(), torch.tensor([6 / 200, 6 / 170]))


@pytest.mark.parametrize("tau", [0.3, 0.9, 0.975])
@pytest.mark.parametrize("min_keep", [0, 7, 500])
def test_matches_naive_oracle(tau: float, min_keep: int) -> None:
    n = 90
    valid = _valid(3, n, [(0, 0), (11, 0), (0, 17)])
    g = _gen(int(tau * 1000) + min_keep)
    colsum = torch.rand(3, n, generator=g) ** 4
    seen = torch.randint(0, 6, (3, n), generator=g).float()
    keep, ratio = select_tokens(colsum.to(DEVICE), seen.to(DEVICE), valid, tau, min_keep)
    for row in range(3):
        expected = _naive_select(colsum[row], seen[row], valid[row].cpu(), tau, min_keep)
        assert _kept(keep, row) == expected
        assert ratio[row].item() == pytest.approx(len(expected) / int(valid[row].sum()))


def test_tau_one_keeps_every_valid_key() -> None:
    valid = _valid(2, 64, [(5, 0), (0, 9)])
    g = _gen(2)
    colsum = torch.rand(2, 64, generator=g)
    colsum[:, 20:30] = 0.0  # keys without mass are kept too
    seen = torch.randint(0, 3, (2, 64), generator=g).float()
    keep, ratio = select_tokens(colsum.to(DEVICE), seen.to(DEVICE), valid, tau=1.0, min_keep=0)
    assert torch.equal(keep, valid)
    assert torch.equal(ratio.cpu(), torch.ones(2))


def test_min_keep_floor_and_forced_last_token() -> None:
    n = 50
    valid = _valid(1, n, [(0, 4)])
    g = _gen(3)
    colsum = 1.0 + torch.rand(1, n, generator=g)
    colsum[0, 45] = 1e-3  # the last valid token scores lowest
    seen = torch.ones(1, n)
    keep, ratio = select_tokens(colsum.to(DEVICE), seen.to(DEVICE), valid, tau=0.01, min_keep=10)
    top9 = colsum[0, :45].topk(9).indices.tolist()
    assert _kept(keep, 0) == set(top9) | {45}
    assert ratio.item() == pytest.approx(10 / 46)
    keep, _ = select_tokens(colsum.to(DEVICE), seen.to(DEVICE), valid, tau=0.01, min_keep=0)
    assert _kept(keep, 0) == {int(colsum[0, :45].argmax()), 45}
    keep, ratio = select_tokens(colsum.to(DEVICE), seen.to(DEVICE), valid, tau=0.01, min_keep=1000)
    assert torch.equal(keep, valid) and ratio.item() == 1.0


def test_ties_go_to_lower_positions() -> None:
    n = 10
    valid = _valid(1, n, [(0, 0)])
    ones = torch.ones(1, n, device=DEVICE)
    keep, _ = select_tokens(ones, ones, valid, tau=0.5, min_keep=0)
    assert _kept(keep, 0) == {0, 1, 2, 3, 4, 9}  # 4 prefix sums below 5, p = 5, plus the last token


def test_probes_recent_random_distinct_and_valid() -> None:
    n, n_recent, n_random = 300, 16, 24
    valid = _valid(3, n, [(0, 0), (40, 0), (0, 60)])
    probes = choose_probes(valid, n_recent, n_random, seed=0).cpu()
    assert probes.dtype == torch.int64 and probes.shape == (3, 40)
    for row in range(3):
        pos = probes[row].tolist()
        assert pos == sorted(pos) and len(set(pos)) == 40
        assert all(valid[row, j] for j in pos)
        last = valid[row].nonzero().flatten()[-n_recent:].tolist()
        assert set(last) <= set(pos)
    # keyed on the rank among valid tokens: the same prompt draws the same probes whatever its padding
    for row, length, shift in ((1, 260, 40), (2, 240, 0)):
        ones = torch.ones(1, length, dtype=torch.bool, device=DEVICE)
        assert torch.equal(probes[row] - shift, choose_probes(ones, n_recent, n_random, seed=0)[0].cpu())


def _naive_probes(valid: torch.Tensor, n_recent: int, n_random: int, seed: int) -> list[int]:
    """One row of choose_probes' definition, as a loop over its valid positions."""
    n = len(valid)
    m = min(n, n_recent + n_random)
    where = valid.nonzero().flatten().tolist()
    recent = where[len(where) - n_recent :] if n_recent else []
    keys = _random_keys(torch.arange(n, dtype=torch.int64), seed).tolist()  # keyed on the rank among valid
    others = sorted(where[: len(where) - len(recent)], key=lambda j: -keys[where.index(j)])
    chosen = sorted(recent + others[:n_random])
    return chosen + [-1] * (m - len(chosen))


@pytest.mark.parametrize("n_recent, n_random", [(8, 8), (0, 12), (12, 0), (30, 40)])
def test_probes_match_naive_definition(n_recent: int, n_random: int) -> None:
    """Random masks (holes anywhere, empty and full rows)."""
    g = _gen(n_recent * 100 + n_random)
    valid = torch.rand(4, 60, generator=g) < torch.tensor([[0.9], [0.3], [0.0], [1.0]])
    for seed in (0, 11):
        probes = choose_probes(valid.to(DEVICE), n_recent, n_random, seed).cpu()
        for row in range(4):
            assert probes[row].tolist() == _naive_probes(valid[row], n_recent, n_random, seed)


def test_probes_unchanged() -> None:
    """The probes drawn for fixed inputs and seeds (a change here changes every model's kept sets)."""
    valid = torch.zeros(3, 40, dtype=torch.bool)
    valid[0] = True
    valid[1, 7:] = True
    valid[2, :31] = True
    valid[2, 12] = False
    expected = {
        0: [
            [1, 13, 25, 26, 31, 32, 36, 37, 38, 39],
            [8, 10, 20, 32, 33, 35, 36, 37, 38, 39],
            [1, 3, 14, 19, 24, 26, 27, 28, 29, 30],
        ],
        5: [
            [0, 10, 12, 16, 20, 30, 36, 37, 38, 39],
            [7, 17, 19, 22, 23, 27, 36, 37, 38, 39],
            [0, 10, 13, 16, 17, 21, 27, 28, 29, 30],
        ],
    }
    for seed, rows in expected.items():
        assert choose_probes(valid.to(DEVICE), 4, 6, seed).cpu().tolist() == rows


def test_mul32_is_exact() -> None:
    g = _gen(12)
    x = torch.cat([torch.randint(0, 2**32, (1000,), generator=g), torch.tensor([0, 1, 2**31, 2**32 - 1])])
    for c in (0x7FEB352D, 0x846CA68B, 2**32 - 1, 1):
        assert _mul32(x, c).tolist() == [(v * c) % 2**32 for v in x.tolist()]
        assert _mul32(2**32 - 1, c) == ((2**32 - 1) * c) % 2**32


def test_probe_seeds() -> None:
    valid = _valid(2, 500, [(0, 0), (100, 0)])
    first = choose_probes(valid, 64, 64, seed=7)
    assert torch.equal(first, choose_probes(valid, 64, 64, seed=7))
    other = choose_probes(valid, 64, 64, seed=8)
    assert not torch.equal(first, other)
    assert torch.equal(first[:, -64:], other[:, -64:])  # the recent window does not depend on the seed


def test_random_probes_are_uniform() -> None:
    """Over 400 seeds each of the 90 non-recent positions is drawn about 400 * 10 / 90 times."""
    valid = torch.ones(1, 100, dtype=torch.bool, device=DEVICE)
    counts = torch.zeros(100)
    for seed in range(400):
        counts[choose_probes(valid, 10, 10, seed)[0].cpu()] += 1
    assert (counts[90:] == 400).all()
    expected = 400 * 10 / 90
    assert counts[:90].min() > expected * 0.45 and counts[:90].max() < expected * 1.7
    assert ((counts[:90] - expected) ** 2 / expected).sum() < 140  # chi-square, 89 dof (p ~ 5e-4)


def test_short_rows_make_every_valid_token_a_probe() -> None:
    valid = _valid(2, 10, [(0, 0), (4, 0)])
    probes = choose_probes(valid, 8, 8, seed=0).cpu()
    assert probes.shape == (2, 10)
    assert probes[0].tolist() == list(range(10))
    assert probes[1].tolist() == list(range(4, 10)) + [-1] * 4
    probes = choose_probes(valid, 3, 4, seed=0).cpu()
    assert probes.shape == (2, 7)
    assert probes[1].tolist() == list(range(4, 10)) + [-1]


def test_compiled_matches_eager() -> None:
    n = 257
    valid = _valid(2, n, [(0, 0), (33, 0)])
    g = _gen(9)
    colsum = torch.rand(2, n, generator=g).to(DEVICE)
    seen = torch.randint(0, 9, (2, n), generator=g).float().to(DEVICE)
    torch._dynamo.reset()
    compiled_probes = torch.compile(choose_probes, fullgraph=True, backend="aot_eager")
    compiled_select = torch.compile(select_tokens, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled_probes(valid, 64, 64, 3), choose_probes(valid, 64, 64, 3))
    eager = select_tokens(colsum, seen, valid, 0.9, 64)
    compiled = compiled_select(colsum, seen, valid, 0.9, 64)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
