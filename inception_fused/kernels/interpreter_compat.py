"""Make Triton <= 3.6's CPU interpreter run the kernels under NumPy >= 2.4.

The interpreter holds a scalar kernel argument as a 1-element NumPy array, and Triton
<= 3.6 turns it into a loop bound with ``int(array)``, which NumPy 2.4 refuses for arrays
with ndim > 0 ("only 0-dimensional arrays can be converted to Python scalars"): every
``for k0 in range(0, C_in, BLOCK_K)`` fails. Triton 3.7+ squeezes the array first; this
does the same for the older interpreter. The compiled path never sees it.
"""

from __future__ import annotations

import inspect


def _squeezed_index(self) -> int:
    return int(self.handle.data.squeeze())


def patch_interpreter_index() -> bool:
    """Install the squeezing ``__index__`` where the interpreter lacks it; True if it did."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # a Triton without the interpreter module: nothing to patch
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "squeezes_index", False):
        return False
    if "int(self.handle.data)" not in inspect.getsource(original):
        return False  # this Triton already converts scalars safely

    def patch_lang_tensor(tensor, *scope) -> None:  # Triton < 3.4 passes no scope
        original(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", _squeezed_index)
        else:
            tensor.__index__ = _squeezed_index

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
