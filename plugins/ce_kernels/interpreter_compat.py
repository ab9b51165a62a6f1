"""Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) with numpy >= 2.4 and triton <= 3.6.

The interpreter holds each scalar kernel argument as a one-element 1-D array, and triton 3.6's
`tensor.__index__` (used by `range(0, n, BLOCK)` over a runtime bound) is `int(array)`, which numpy
2.4 refuses for anything but 0-D arrays ("only 0-dimensional arrays can be converted to Python
scalars"). Later triton takes `.squeeze()` first. `patch()` makes any triton do that, by wrapping
the interpreter's own tensor patching; compiled kernels are untouched.
"""

from __future__ import annotations

import os


def patch() -> bool:
    """Install the fix when interpreting; True when installed (or already), False when not needed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # a triton without this hook: nothing to fix here
        return False
    if getattr(original, "ce_kernels_scalar_index", False):
        return True

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor.ce_kernels_scalar_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
