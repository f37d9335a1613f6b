"""The staged demo run: load, (dense run), compile + warm-up, timed zipvl run, with a progress bar over the
stages, the prefill / decode timings of ``generate`` and the peak memory growth of each run."""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import sys
import threading
import time
from typing import Any

import torch

import zipvl_compile
from zipvl_compile.demo.facts import collect
from zipvl_compile.demo.load import Subject, load_subject
from zipvl_compile.model_parts import vision_tower


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run, from checked arguments: model (None: the default; ignored for tiny_vlm), prompt (None for
    tiny_vlm), the zipvl options (valid ``ZipVLConfig`` options), and whether to stream the text."""

    model: str | None
    tiny_vlm: str | None
    prompt: str | None
    max_new_tokens: int
    compare_dense: bool
    stream: bool
    device: str
    dtype: torch.dtype
    options: dict[str, Any]

    @property
    def stage_names(self) -> list[str]:
        return ["load", *(["dense (uncompiled) run"] if self.compare_dense else []), "compile", "prefill", "decode"]


# -- progress -----------------------------------------------------------------------------------------------
class Stages:
    """A progress bar (tqdm, stderr) over the named stages, shown only when ``enabled``.

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

    def __enter__(self) -> Stages:
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


# -- timing and memory --------------------------------------------------------------------------------------
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


class PeakMemory:
    """Peak memory growth over a block: CUDA ``max_memory_allocated``; on CPU the process RSS sampled every
    millisecond from ``/proc/self/statm``, or the ``ru_maxrss`` high-water mark where there is no /proc."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.sampled = not self.cuda and os.path.exists("/proc/self/statm")
        self.kind = "CUDA max allocated" if self.cuda else "process RSS growth"
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
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
        """Bytes the peak rose above the level at the start of the block (0 if it did not rise)."""
        return max(self.peak - self.base, 0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# Prefills timed per model (the median is reported): one prefill of the default prompt, ~0.6 s on two CPU cores,
# varies by 5-10% from run to run, more than the difference the --compare-dense table is there to show.
PREFILL_RUNS = 3


def _generate_tokens(subject: Subject, max_new: int, tokens: int) -> float:
    """Generate ``tokens`` tokens with the timed run's max_new_tokens (so cache sizes, hence graphs, are the
    timed run's); returns the seconds taken."""
    from transformers import StoppingCriteriaList

    start = time.perf_counter()
    stop = StoppingCriteriaList([_StopAfter(subject.inputs["input_ids"].shape[1], tokens)])
    with torch.no_grad():
        subject.model.generate(**subject.inputs, max_new_tokens=max_new, do_sample=False, stopping_criteria=stop)
    return time.perf_counter() - start


def warm_up(subject: Subject, max_new: int) -> float:
    """Two tokens (:func:`_generate_tokens`): compiles, or warms up, the prefill and the decode. Returns the seconds
    taken."""
    return _generate_tokens(subject, max_new, 2)


def generate(subject: Subject, max_new: int, device: str, stream: bool = False, on_first: Any = None) -> dict[str, Any]:
    """Greedy generate, timed: prefill seconds (the median over :data:`PREFILL_RUNS` prefills: the generate's own
    time to its first token and that of ``PREFILL_RUNS - 1`` one-token generates before it), decode tokens/s, peak
    memory growth, new tokens and text.

    stream: print the text as it is generated; on_first: called once the first new token is out (prefill done).
    """
    from transformers import TextStreamer

    prefills = [_generate_tokens(subject, max_new, 1) for _ in range(PREFILL_RUNS - 1)]
    tok = subject.tokenizer
    text = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    clock = _Clock(text, on_first)
    n_prompt = subject.inputs["input_ids"].shape[1]
    with torch.no_grad(), PeakMemory(device) as memory:
        out = subject.model.generate(**subject.inputs, max_new_tokens=max_new, do_sample=False, streamer=clock)
    new = out[0, n_prompt:].tolist()
    t = clock.times
    decode_s = t[-1] - t[1] if len(t) > 2 else None
    return {
        "new_tokens": len(new),
        "token_ids": new,
        "text": tok.decode(new, skip_special_tokens=True) if tok is not None else None,
        "prefill_s": statistics.median([t[1] - t[0], *prefills]),
        "prefill_runs": PREFILL_RUNS,
        "decode_s": decode_s,
        "decode_tokens_per_s": (len(t) - 2) / decode_s if decode_s else None,
        "peak_memory_bytes": memory.growth,
        "peak_memory_kind": memory.kind,
    }


# -- the run ------------------------------------------------------------------------------------------------
def staged_run(plan: Plan, stages: Stages) -> dict[str, Any]:
    """Load, (dense run), compile + warm-up, timed zipvl run; returns the facts of :func:`facts.collect`."""
    torch._dynamo.reset()
    zipvl_compile.reset_report()
    stages.start("load")
    subject = load_subject(plan.model, plan.tiny_vlm, plan.prompt, plan.max_new_tokens, plan.device, plan.dtype)
    stages.done()
    dense = None
    if plan.compare_dense:
        stages.start("dense (uncompiled) run")
        warm_up(subject, plan.max_new_tokens)
        dense = generate(subject, plan.max_new_tokens, plan.device)
        stages.done()
    stages.start("compile")
    tower = vision_tower(subject.model)
    zipvl_compile.compile(subject.model, **plan.options)
    if tower is not None:  # compiled too, so that the report shows the backend leaving its attention alone
        tower.forward = torch.compile(tower.forward, backend="zipvl", options=plan.options)
    compile_s = warm_up(subject, plan.max_new_tokens)
    stages.done()
    stages.start("prefill")
    stream = plan.stream and subject.tokenizer is not None

    def first_token() -> None:  # prefill done; when streaming, the text goes below the bar from here on
        stages.done()
        stages.start("decode")
        if stream:
            stages.detach()
            print(f"--- zipvl output ({subject.name}) ---", flush=True)

    zipvl = generate(subject, plan.max_new_tokens, plan.device, stream=stream, on_first=first_token)
    stages.finish()
    return collect(subject, plan.device, plan.dtype, plan.options, dict(zipvl, compile_s=compile_s), dense, tower)
