"""Developer tooling, not part of the installed package (pyproject.toml installs flash_kernels*
only): ahead-of-time compile of recorded kernel launches without a GPU (`tools.aot_compile`) and
the code-generation gate over the compiled kernels (`tools.codegen_gate`). Tests and bench import
it from the repository root; child processes get the root on PYTHONPATH."""
