"""Option validation: unknown keys and bad values raise ValueError naming the key, value and what is allowed."""

import pytest
import torch

import zipvl_compile
from zipvl_compile import ZipVLConfig


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("tau", 0.0, "0 < tau"),
        ("tau", -1, "0 < tau"),
        ("tau", "x", "0 < tau"),
        ("tau", 1.5, "tau <= 1"),
        ("hi_bits", 3, "(2, 4, 8, 16)"),
        ("lo_bits", 5, "(2, 4, 8, 16)"),
        ("lo_bits", 8, "<= hi_bits"),
        ("n_probe_recent", -1, ">= 0"),
        ("min_keep", 1.5, ">= 0"),
        ("recompress_interval", 0, ">= 1"),
        ("kv_mode", "fast", "packed"),
        ("inner", "cudagraphs", "None (by device) or one of"),
        ("seed", "a", "integer"),
        ("dense_layers", [0, -1], "layer indices"),
        ("dense_layers", 3, "layer indices"),
        ("cudagraphs", "yes", "True or False"),
        ("score_norm", "zipcache", "n_minus_j"),
        ("local_window", -1, ">= 1"),
        ("dense_below", -1, "None (the device's measured crossover)"),
        ("dense_below", 2.5, "an integer >= 0"),
    ],
)
def test_bad_value_names_key_value_and_allowed(key, value, allowed):
    with pytest.raises(ValueError) as err:
        ZipVLConfig.from_options({key: value})
    msg = str(err.value)
    assert key in msg and repr(value) in msg and allowed in msg


def test_unknown_key():
    with pytest.raises(ValueError, match=r"unknown option 'taux'.*allowed options: .*tau"):
        ZipVLConfig.from_options({"taux": 0.9})


def test_no_probes():
    with pytest.raises(ValueError, match="n_probe_recent"):
        ZipVLConfig.from_options({"n_probe_recent": 0, "n_probe_random": 0})


def test_defaults_and_keeps_all():
    cfg = ZipVLConfig.from_options(None)
    assert (cfg.tau, cfg.hi_bits, cfg.lo_bits, cfg.recompress_interval) == (0.975, 4, 2, 100)
    assert not cfg.keeps_all and ZipVLConfig.from_options({"tau": 1.0}).keeps_all
    assert ZipVLConfig.from_options({"dense_layers": [3, 1]}).dense_layers == (1, 3)


def test_bad_option_raises_through_torch_compile():
    def f(x):
        return torch.relu(x) + 1

    compiled = torch.compile(f, backend="zipvl", options={"tau": 2})
    with pytest.raises(Exception, match="tau=2"):
        compiled(torch.randn(1, 2))


def test_backend_registered_by_name():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("zipvl") is zipvl_compile.zipvl_backend


def test_inner_compiler_by_device(monkeypatch):
    """inner None (the default) means Inductor on CUDA and eager elsewhere; an explicit choice is kept; the backend
    resolves it from the graph's inputs."""
    from zipvl_compile import backend

    assert (ZipVLConfig().inner_for("cuda"), ZipVLConfig().inner_for("cpu")) == ("inductor", "eager")
    assert ZipVLConfig(inner="aot_eager").inner_for("cuda") == "aot_eager"
    seen = []
    inner_compile = backend._inner_compile

    def spy(gm, example_inputs, config, cudagraphs):
        seen.append(config.inner)
        return inner_compile(gm, example_inputs, config, cudagraphs)

    monkeypatch.setattr(backend, "_inner_compile", spy)
    torch._dynamo.reset()
    fn = torch.compile(lambda x: torch.softmax(x, -1) * 2, backend="zipvl")
    torch.testing.assert_close(fn(torch.ones(3)), torch.full((3,), 2 / 3))
    assert seen == ["eager"]
