"""bench/sass.py: the loop parser on a hand-written listing, and the decode kernel compiled for sm_90 on this
machine (no GPU), whose block loops must issue at least one and-or and one multiply-add per code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench import sass

LISTING = (  # triton.tools.disasm's format: control codes, a tab, the instruction
    "Function:kernel\n--:-:0:-:8\tMOV R1, c[0x0][0x28];\nLBB0:\n"
    + "".join(f"--:-:-:-:1\tFFMA R{i}, R2, R3, R{i};\n" for i in range(40))
    + "--:-:5:-:1\t@!P0 LDG.E.128 R4, desc[UR4][R6.64];\n--:-:-:Y:5\t@P1 BRA LBB0;\n"
    + "LBB1:\n--:-:-:-:1\tIADD3 R1, R1, 0x1, RZ;\n--:-:-:Y:5\t@P2 BRA LBB1;\n--:-:-:Y:5\tEXIT;\n"
)


def test_loops_counts_a_backward_branch_body():
    """One loop of 42 instructions (the label's first instruction to its branch), predicates and modifiers stripped
    from the opcodes; the 2-instruction loop and the code outside are left out."""
    (loop,) = sass.loops(LISTING)
    assert loop.label == "LBB0" and loop.instructions == 42
    assert loop.opcodes == {"FFMA": 40, "LDG": 1, "BRA": 1}


def test_decode_kernel_compiles_for_sm90_offline():
    """The CUDA-core path at 2 bits: two segment loops (hi, lo) of at least 128 and-ors and 128 multiply-adds per
    64-slot block and thread (64 x 128 x 2 codes over 128 threads), and the tail's loop on the tensor cores."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "bench/sass.py", "--path", "fma", "--bits", "2"],
        cwd=root,
        env={**env, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("loop ")]
    assert len(lines) == 3, out.stdout
    for line in lines[:2]:
        counts = dict(item.rsplit(" ", 1) for item in line.split("; ", 1)[1].split(", "))
        assert int(counts["LOP3"]) >= 128 and int(counts["FFMA"]) >= 128, line
    assert "HMMA" in lines[2], lines[2]
