"""Offline SASS of the decode partial kernel: compile it for sm_90 on any machine (no GPU needed) and count the
instructions of its loops, by opcode.

A loop is a backward branch of the disassembly; its body is what one iteration issues (on the segment paths: one
64-slot block, per thread), a rarely taken branch inside it included. Counts rank candidates before device time
is spent; only a GPU run decides (docs/architecture.md, trap 31).

    python bench/sass.py --path fma --bits 4                 # the CUDA-core path at the policy's launch tuning
    python bench/sass.py --path swap --bits 2 --n-rep 7      # the tensor-core path, GQA 28/4
    python bench/sass.py --path fma --bits 4 --dump k.sass   # also write the whole disassembly

Needs the compiler, not the interpreter: ``TRITON_INTERPRET`` must be unset.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
from typing import NamedTuple

GPU_TARGET = ("cuda", 90, 32)  # the H200's architecture, warp size
D = 128  # head dim, as in bench/decode_attention.py


class Loop(NamedTuple):
    """A loop of a SASS listing: its label, instructions per iteration and their opcodes (predicates and
    modifiers stripped: ``@!P0 LDG.E.128`` counts as ``LDG``)."""

    label: str
    instructions: int
    opcodes: collections.Counter


def compile_sass(path: str, bits: int, n_rep: int, num_warps: int, maxnreg: int, channels: int, stages: int) -> str:
    """SASS (``triton.tools.disasm`` format) of ``decode._decode_partial_kernel`` for sm_90 at these constexprs
    and launch options, with both segments at ``bits``, bf16 queries and the pointers 16-byte aligned (as
    torch allocates them). maxnreg 0: uncapped."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource
    from triton.tools.disasm import get_sass

    from zipvl_compile.runtime.kernels import decode as dec
    from zipvl_compile.runtime.layout import GROUP

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("bench/sass.py compiles kernels: unset TRITON_INTERPRET")
    code = "*u32" if path == "fma" else "*u8"  # the CUDA-core path reads the codes as words
    segment = lambda p: {
        **{f"{p}{name}": code for name in ("kc", "vc")},
        **{f"{p}{name}": "*fp16" for name in ("ks", "kz", "vs", "vz")},
        **{f"{p}{name}": "*i32" for name in ("pos", "fill")},
    }
    signature = {
        "q_ptr": "*bf16",
        **segment("h"),
        "C_HI": "i32",
        "S_HI": "i32",
        **segment("l"),
        "C_LO": "i32",
        "S_LO": "i32",
        "kt": "*bf16",
        "vt": "*bf16",
        "tpos": "*i32",
        "tlen": "*i32",
        "R": "i32",
        "acc_ws": "*fp32",
        "m_ws": "*fp32",
        "den_ws": "*fp32",
        "H": "i32",
        "n_rep": "i32",
        "qk_scale": "fp32",
    }
    fn = dec._decode_partial_kernel
    signature = {name: signature[name] for name in fn.arg_names if name in signature}
    constexprs = dict(
        HI_BITS=bits,
        LO_BITS=bits,
        D=D,
        NP=max(dec._MIN_ROWS[path], triton.next_power_of_2(n_rep)),
        BLOCK=GROUP,
        F32=False,
        ASM=True,
        PATH=dec.PATHS.index(path),
        CPT=channels,
        WARPS=num_warps,
    )
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    aligned = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items() if v[0] == "*"}
    options = dict(num_warps=num_warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs, aligned), target=GPUTarget(*GPU_TARGET), options=options
    )
    return get_sass(kernel.asm["cubin"])


def loops(sass: str) -> list[Loop]:
    """The loops of a SASS listing (``LBBn:`` labels, ``ctrl  INSTR ;`` lines), in order, bodies of more than
    30 instructions (the partial kernel's block loops; the merge's and the address loops' are smaller)."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        text = line.strip()
        if label := re.fullmatch(r"(\w+):", text):
            labels[label.group(1)] = len(instructions)
        elif ins := re.match(r"^[-\w]+:[-\w]+:[-\w]+:[-\w]+:\w+\s+(.*?);?$", text):
            instructions.append(ins.group(1))
    found = []
    for end, ins in enumerate(instructions):
        target = re.search(r"BRA\s+(?:.*?)(LBB\w+)", ins)
        start = labels.get(target.group(1)) if target else None
        if start is not None and start <= end and end + 1 - start > 30:
            body = instructions[start : end + 1]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in body)
            found.append(Loop(target.group(1), len(body), ops))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", choices=("fma", "swap"), default="fma", help="the segment path")
    parser.add_argument("--bits", type=int, choices=(2, 4, 8), default=4, help="both segments' bit width")
    parser.add_argument("--n-rep", type=int, default=1, help="query heads per KV head (1 on the fma path)")
    parser.add_argument("--warps", type=int, help="warps per program (default: the policy's num_warps)")
    parser.add_argument("--maxnreg", type=int, help="register cap, 0 uncapped (default: the policy's)")
    parser.add_argument("--channels", type=int, help="channels per thread, fma path (default: the policy's)")
    parser.add_argument("--stages", type=int, help="software-pipelining depth (default: the policy's)")
    parser.add_argument("--dump", metavar="FILE", help="also write the whole SASS listing there")
    opts = parser.parse_args()
    from zipvl_compile.runtime.kernels import decode as dec

    policy = dec.tuning(opts.path)
    sass = compile_sass(
        opts.path,
        opts.bits,
        opts.n_rep,
        opts.warps or policy.num_warps,
        policy.maxnreg if opts.maxnreg is None else opts.maxnreg,
        opts.channels or policy.channels_per_thread,
        opts.stages or policy.num_stages,
    )
    if opts.dump:
        with open(opts.dump, "w") as f:
            f.write(sass)
    registers = max(int(r) for r in re.findall(r"\bR(\d+)\b", sass))
    print(f"{opts.path} path, {opts.bits}-bit segments, n_rep {opts.n_rep}: highest register R{registers}")
    for loop in loops(sass):
        mix = ", ".join(f"{op} {n}" for op, n in loop.opcodes.most_common(16))
        print(f"loop {loop.label}: {loop.instructions} instructions per iteration; {mix}")


if __name__ == "__main__":
    main()
