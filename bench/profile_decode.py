"""Where a decode step's time goes: HF static + compile against zipvl, on bench.decode's model and setup.

    python -m bench.profile_decode [--context 8192] [--batch 1] [--methods static zipvl] [--steps 20]

Per method, after the warm-up (compilation, CUDA-graph recording): the wall time per step, then a
``torch.profiler`` trace of ``--steps`` steps (GPU kernels replayed from CUDA graphs included): kernels per step,
GPU busy time per step, and the kernels taking the most time; then ``cProfile`` of the same number of steps
(host time per function, cumulative). Printed, and written to $OUT/profile_decode.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections import defaultdict

import torch

from bench._timing import device_name, write_json
from bench.decode import build_model, prompt, static_stepper, zipvl_stepper

STEPPERS = {"static": static_stepper, "zipvl": zipvl_stepper}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile(name: str, model, ids: torch.Tensor, warmup: int, steps: int, top: int) -> dict:
    """One method's profile (see the module docstring)."""
    torch._dynamo.reset()
    n = ids.shape[1]
    first, step, _ = STEPPERS[name](model, ids, n + warmup + 3 * steps + 8)
    token, pos = first, n

    def run(count: int) -> None:
        nonlocal token, pos
        for _ in range(count):
            token = step(token, pos).argmax(-1, keepdim=True)
            pos += 1

    with torch.no_grad():
        run(warmup)
        _sync()
        began = time.perf_counter()
        run(steps)
        _sync()
        wall_ms = (time.perf_counter() - began) * 1e3 / steps
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            run(steps)
            _sync()
        host = cProfile.Profile()
        host.enable()
        run(steps)
        _sync()
        host.disable()
    kernels: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name].append(event.device_time)
    per_step = sorted(
        ((sum(times) / steps, len(times) / steps, kernel) for kernel, times in kernels.items()), reverse=True
    )
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("cumulative").print_stats(top)
    return {
        "wall_ms_per_step": wall_ms,
        "kernels_per_step": sum(len(t) for t in kernels.values()) / steps,
        "gpu_us_per_step": sum(sum(t) for t in kernels.values()) / steps,
        "top_kernels": [
            {"us_per_step": us, "per_step": count, "name": kernel[:160]} for us, count, kernel in per_step[:top]
        ],
        "host": text.getvalue(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--methods", nargs="+", default=list(STEPPERS), choices=list(STEPPERS))
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    args = parser.parse_args(argv)
    model = build_model(args.smoke)
    ids = prompt(model, args.batch, 64 if args.smoke else args.context)
    result = {"device": device_name(), "torch": torch.__version__, "context": ids.shape[1], "batch": args.batch}
    for name in args.methods:
        res = profile(name, model, ids, args.warmup, args.steps, args.top)
        result[name] = res
        print(f"== {name}: {res['wall_ms_per_step']:.3f} ms/step wall, {res['kernels_per_step']:.0f} kernels and")
        print(f"   {res['gpu_us_per_step']:.0f} us of GPU time per step")
        for row in res["top_kernels"]:
            print(f"   {row['us_per_step']:9.1f} us {row['per_step']:6.1f}x  {row['name']}")
        print(res["host"])
        write_json("profile_decode.json", result)
    return result


if __name__ == "__main__":
    main()
