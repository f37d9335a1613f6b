"""zipvl: the log namespace of zipvl_compile, and nothing else.

zipvl_compile logs through ``logging.getLogger("zipvl")``. ``TORCH_LOGS`` accepts any importable module name,
so ``TORCH_LOGS="zipvl"`` (INFO) or ``TORCH_LOGS="+zipvl"`` (DEBUG) finds this package and enables that
logger with torch's handler and format. torch imports this package while torch itself is being imported, so
it imports nothing (not torch, not zipvl_compile) and has no submodules.
"""
