"""Where the time goes: GPU kernels and host functions of a decode step or a prefill, zipvl beside its baseline.

    python -m bench.breakdown decode [--context 8192] [--batch 1] [--methods static zipvl] [--steps 20]
    python -m bench.breakdown prefill [--length 32768] [--ratio 0.4] [--methods fa4 zipvl] [--steps 2]
    python -m bench.breakdown op [--length 8192] [--shape qwen2-7b] [--mode sinks]   # zipvl.sparse_attention alone
    python -m bench.breakdown {decode,prefill,op} --smoke    # tiny sizes on the CPU

``decode``: bench.decode's model and setup (HF static cache + ``torch.compile(mode="reduce-overhead")``, or the
packed ZipVLCache under the zipvl backend with CUDA graphs); a step is one greedy token. ``prefill``:
bench.prefill's Qwen2-7B-shaped model and options (HF with FA4 when importable, else sdpa; or zipvl with the kept
ratio forced to ``--ratio``); a step is one forward of the prompt. ``op``: the whole ``zipvl.sparse_attention`` op
called eagerly as ``bench.prefill_attention`` times it (``--shape`` of its shapes, planted sparsity at
``--ratio``, tau 0.975, prefill mode ``--mode``), beside dense attention (FA4 when importable, else SDPA). Per
method, after ``--warmup`` steps (compilation, CUDA-graph recording): the wall time per step, then a
``torch.profiler`` trace of ``--steps`` steps (kernels replayed from CUDA graphs included): kernels per step, GPU
busy time per step, the kernels taking the most time; then ``cProfile`` of as many steps (host time per function,
cumulative and own). Printed, and written to $OUT/breakdown_{decode,prefill,op}.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from bench import decode, prefill, prefill_attention
from bench._timing import device_name, write_json

METHODS = {"decode": ("static", "zipvl"), "prefill": ("hf", "zipvl"), "op": ("dense", "zipvl")}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile(step: Callable[[], None], warmup: int, steps: int, top: int) -> dict:
    """The profile of ``step()`` (see the module docstring) as plain values."""
    run = lambda count: [step() for _ in range(count)]
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
    for order in ("cumulative", "tottime"):
        pstats.Stats(host, stream=text).sort_stats(order).print_stats(top)
    return {
        "wall_ms_per_step": wall_ms,
        "kernels_per_step": sum(len(t) for t in kernels.values()) / steps,
        "gpu_us_per_step": sum(sum(t) for t in kernels.values()) / steps,
        "top_kernels": [
            {"us_per_step": us, "per_step": count, "name": kernel[:160]} for us, count, kernel in per_step[:top]
        ],
        "host": text.getvalue(),
    }


def decode_steps(args: argparse.Namespace) -> tuple[dict, dict[str, Callable[[], Callable[[], None]]]]:
    """The run's facts and, per method, a maker of its decode step (prefill and compile when called)."""
    model = decode.build_model(args.smoke)
    ids = decode.prompt(model, args.batch, 64 if args.smoke else args.context)
    total = ids.shape[1] + args.warmup + 3 * args.steps + 8
    steppers = dict(zip(METHODS["decode"], (decode.static_stepper, decode.zipvl_stepper), strict=True))

    def maker(name: str) -> Callable[[], None]:
        first, step, _ = steppers[name](model, ids, total)
        state = {"token": first, "pos": ids.shape[1]}

        def one() -> None:
            state["token"] = step(state["token"], state["pos"]).argmax(-1, keepdim=True)
            state["pos"] += 1

        return one

    facts = {"context": ids.shape[1], "batch": args.batch}
    return facts, {name: (lambda name=name: maker(name)) for name in args.methods or METHODS["decode"]}


def prefill_steps(args: argparse.Namespace) -> tuple[dict, dict[str, Callable[[], Callable[[], None]]]]:
    """As :func:`decode_steps`, a step being one forward of the prompt."""
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    model = prefill.build_model(prefill.TINY if args.smoke else prefill.QWEN2_7B, "sdpa", device, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, 256 if args.smoke else args.length), device=device)
    dense = "fa4" if not args.smoke and prefill.register_fa4() else "sdpa"

    def hf() -> Callable[[], None]:
        model.set_attn_implementation(dense)
        return lambda: prefill.forward(model, ids)

    def zipvl() -> Callable[[], None]:
        model.set_attn_implementation("sdpa")
        compiled = prefill.compile_zipvl(model, args.ratio, dense_below=0)
        return lambda: prefill.forward(compiled, ids)

    makers = dict(zip(METHODS["prefill"], (hf, zipvl), strict=True))
    facts = {"length": ids.shape[1], "ratio": args.ratio, "dense": dense}
    return facts, {name: makers[name] for name in args.methods or METHODS["prefill"]}


def op_steps(args: argparse.Namespace) -> tuple[dict, dict[str, Callable[[], Callable[[], None]]]]:
    """As :func:`decode_steps`, a step being one call of the op (or of dense attention) on one layer's inputs."""
    from zipvl_compile.config import ZipVLConfig
    from zipvl_compile.runtime import ops

    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    shape = prefill_attention.SHAPES[args.shape]
    t = prefill_attention.planted(shape, 512 if args.smoke else args.length, args.ratio, dtype, device)
    q, k, v = t.bhsd()
    cfg = ZipVLConfig()
    rows = ops.probe_rows(q, is_causal=True, **cfg.probe_kwargs())
    kwargs = {**cfg.probe_kwargs(), **cfg.selection_kwargs(), "prefill_mode": args.mode}
    kwargs.update(is_causal=True, scale=t.scale, n_rep=t.n_rep)
    backends = prefill_attention.dense_backends()
    dense = backends.get("fa4") or next(iter(backends.values()))
    makers = {
        "dense": lambda: lambda: dense(t),
        "zipvl": lambda: lambda: ops.sparse_attention(q, k, v, probe_rows=rows, **kwargs),
    }
    facts = {"length": q.shape[2], "ratio": args.ratio, "shape": args.shape, "mode": args.mode}
    return facts, {name: makers[name] for name in args.methods or METHODS["op"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=list(METHODS))
    parser.add_argument("--context", type=int, default=8192, help="decode: prompt tokens before the steps")
    parser.add_argument("--batch", type=int, default=1, help="decode: batch size")
    parser.add_argument("--length", type=int, default=32768, help="prefill, op: prompt tokens")
    parser.add_argument("--ratio", type=float, default=0.4, help="prefill: zipvl's forced kept ratio; op: planted")
    shapes, modes = list(prefill_attention.SHAPES), list(prefill_attention.MODES)
    parser.add_argument("--shape", default="qwen2-7b", choices=shapes, help="op: the heads of the layer")
    parser.add_argument("--mode", default="sinks", choices=modes, help="op: the prefill mode")
    parser.add_argument("--steps", type=int, default=None, help="profiled steps (default: decode 20, prefill 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: decode 8, prefill 1)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--methods", nargs="+", help="decode: static, zipvl; prefill: hf, zipvl; op: dense, zipvl")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    args = parser.parse_args(argv)
    known = METHODS[args.what]
    if not set(args.methods or ()) <= set(known):
        parser.error(f"{args.what} methods are {', '.join(known)}, got {' '.join(args.methods)}")
    steps, warmup = {"decode": (20, 8), "prefill": (2, 1), "op": (20, 3)}[args.what]
    args.steps, args.warmup = args.steps or steps, args.warmup or warmup
    facts, makers = {"decode": decode_steps, "prefill": prefill_steps, "op": op_steps}[args.what](args)
    result = {"device": device_name(), "torch": torch.__version__, **facts}
    for name, make in makers.items():
        torch._dynamo.reset()
        res = profile(make(), args.warmup, args.steps, args.top)
        result[name] = res
        print(f"== {name}: {res['wall_ms_per_step']:.3f} ms/step wall, {res['kernels_per_step']:.0f} kernels and")
        print(f"   {res['gpu_us_per_step']:.0f} us of GPU time per step")
        for row in res["top_kernels"]:
            print(f"   {row['us_per_step']:9.1f} us {row['per_step']:6.1f}x  {row['name']}")
        print(res["host"])
        write_json(f"breakdown_{args.what}.json", result)
    return result


if __name__ == "__main__":
    main()
