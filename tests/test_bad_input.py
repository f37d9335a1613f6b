"""Bad input gets a clear error naming the problem (never a kernel traceback or a wrong answer); two compiled
models keep separate reports and caches."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import zipvl_compile
from zipvl_compile import ZipVLCache
from zipvl_compile.runtime.cache import layer_kinds
from zipvl_compile.testing import TXT, build_text


def _ids(n=24, batch=1):
    return torch.randint(3, 500, (batch, n), generator=torch.Generator().manual_seed(n))


@pytest.fixture(scope="module")
def model():
    torch._dynamo.reset()
    return zipvl_compile.compile(build_text("llama"), tau=0.9, min_keep=4, inner="eager")


def _generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, max_new_tokens=kwargs.pop("new", 4), do_sample=False, **kwargs)


def test_empty_prompt(model):
    with pytest.raises(ValueError, match="empty prompt"):
        _generate(model, torch.empty(1, 0, dtype=torch.long))


def test_row_all_padding(model):
    ids = _ids(batch=2)
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] are all padding"):
        _generate(model, ids, attention_mask=mask)


def test_prompt_longer_than_the_context(model):
    with pytest.raises(ValueError, match="more than the model's context of 512"):
        _generate(model, _ids(510), new=8)


def test_cache_of_another_model(model):
    other = ZipVLCache(build_text("gemma3"), max_cache_len=40)
    with pytest.raises(ValueError, match="built for another model"):
        _generate(model, _ids(), past_key_values=other)


def test_max_cache_len_smaller_than_the_prompt(model):
    with pytest.raises(ValueError, match="max_cache_len=10"):
        _generate(model, _ids(), past_key_values=ZipVLCache(model, max_cache_len=10))
    plain = build_text("llama")  # without generate's checks: the cache itself refuses
    with pytest.raises(ValueError, match="the prompt is 24 tokens but the ZipVLCache was built for max_cache_len=10"):
        with torch.no_grad():
            plain(input_ids=_ids(), past_key_values=ZipVLCache(plain, max_cache_len=10))


def test_options_changed_on_a_compiled_model(model):
    assert zipvl_compile.compile(model, tau=0.9, min_keep=4, inner="eager") is model  # same options: nothing
    with pytest.raises(ValueError, match=r"already compiled with other options \(tau: 0.9 -> 0.8\)"):
        zipvl_compile.compile(model, tau=0.8, min_keep=4, inner="eager")


def test_dense_layers_outside_the_model():
    with pytest.raises(ValueError, match=r"the model has 2 decoder layers \(0..1\), not \[5\]"):
        zipvl_compile.compile(build_text("llama"), dense_layers=[0, 5])


def test_unsupported_layer_kinds():
    config = T.Qwen3NextConfig(**TXT) if hasattr(T, "Qwen3NextConfig") else None
    if config is None:
        pytest.skip("no Qwen3-Next in this transformers")
    with pytest.raises(ValueError, match="'linear_attention'"):
        layer_kinds(config)


def test_two_models_keep_separate_reports_and_caches():
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    llama = zipvl_compile.compile(build_text("llama"), tau=0.9, min_keep=4, inner="eager")
    qwen = zipvl_compile.compile(build_text("qwen2"), tau=1.0, inner="eager")
    _generate(llama, _ids(30))
    _generate(qwen, _ids(40))
    mine, theirs = zipvl_compile.report(llama), zipvl_compile.report(qwen)
    assert mine is llama.zipvl_report and theirs is qwen.zipvl_report
    ids = lambda rep: {g.graph_id for g in rep.graphs}
    assert ids(mine) and ids(theirs) and not ids(mine) & ids(theirs)
    assert ids(mine) | ids(theirs) == ids(zipvl_compile.report())  # the process-wide report sees both
    assert mine.cache is not theirs.cache and mine.kv_bytes_dense != theirs.kv_bytes_dense
    assert llama.zipvl_cache_pool is not qwen.zipvl_cache_pool
    assert all(s.op == "zipvl.attention" for s in theirs.sites if s.kind == "prefill")
    assert any(s.op == "zipvl.sparse_attention" for s in mine.sites)
