"""Self-test of the Triton kernels on this machine: `python -m flash_kernels.selftest`
(__main__.py) or `flash_kernels.self_test()`. What it runs and prints: runner.py."""

from .runner import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PASSED,
    EXIT_UNAVAILABLE,
    PATH_NAMES,
    PATHS,
    DecodePath,
    OpPath,
    SelfTestReport,
    SelfTestRow,
    SelfTestUnavailable,
    main,
    self_test,
)

__all__ = [
    "DecodePath",
    "OpPath",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_PASSED",
    "EXIT_UNAVAILABLE",
    "PATHS",
    "PATH_NAMES",
    "SelfTestReport",
    "SelfTestRow",
    "SelfTestUnavailable",
    "main",
    "self_test",
]
