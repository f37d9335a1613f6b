"""The ``zipvl-demo`` program (also ``python -m zipvl_compile``), one job per module.

- :mod:`~zipvl_compile.demo.cli`: the arguments, their checks and :func:`~zipvl_compile.demo.cli.main`.
- :mod:`~zipvl_compile.demo.load`: the model under test (a local checkpoint, a GGUF file, the embedded
  SmolLM2 or a tiny random VLM) and its prompt.
- :mod:`~zipvl_compile.demo.run`: the staged run with its progress bar, the timings and the peak memory.
- :mod:`~zipvl_compile.demo.facts`: every figure of a run as plain JSON values.
- :mod:`~zipvl_compile.demo.render`: those figures as text tables or JSON; :mod:`~zipvl_compile.demo.plot`:
  as a PNG.
"""
