"""Triton < 3.7's interpreter under numpy >= 2.4: a test-time repair, applied on import.

That interpreter gives `tl.tensor` an `__index__` of `int(handle.data)` while a kernel runs, so
`range(n)` over a run-time scalar `n` (a 1-element array) converts an array of ndim 1; numpy >=
2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars") and every kernel
loop with a run-time bound fails. `.item()` first is what numpy did implicitly before. The GPU
machines pair Triton 3.6 with numpy 2.5, so their test runs under the interpreter need it.

Imported by conftest and by tests/helpers.py, so that processes a test starts (spawned ranks,
subprocesses that import a test module) are repaired too. The package itself does not depend
on the interpreter and is never patched outside the tests.
"""

import os


def version_tuple(text):
    """(major, minor) of a version string such as "3.6.0" or "2.11.0+cu130"."""
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


def patch_old_interpreter_for_new_numpy():
    """Repair the interpreter where it needs it (idempotent); a no-op elsewhere."""
    import numpy
    import triton

    if version_tuple(triton.__version__) >= (3, 7) or version_tuple(numpy.__version__) < (2, 4):
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "repaired_for_numpy", False):
        return

    def patch_tensor_with_scalar_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_tensor_with_scalar_index.repaired_for_numpy = True
    interpreter._patch_lang_tensor = patch_tensor_with_scalar_index


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    patch_old_interpreter_for_new_numpy()
