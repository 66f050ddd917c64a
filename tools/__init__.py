"""Developer tooling, not part of the installed package (pyproject.toml installs flash_kernels*
only; it works from a checkout): the launch recorder (`tools.launch_recording`, on the one
callback hook of flash_kernels/backends/triton/launch.py), the ahead-of-time compile of recorded
kernel launches without a GPU (`tools.aot_compile`) and the code-generation gate over the
compiled kernels (`tools.codegen_gate`). Tests and bench import it from the repository root;
child processes get the root on PYTHONPATH."""
