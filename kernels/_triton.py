"""Triton where it is installed, and stand-ins where it is not.

The kernel modules keep each @triton.jit kernel beside its launcher and its torch reference. So that
the references (and everything that trains with them: the CPU, a machine without Triton) do not need
Triton, those modules take ``triton``, ``tl`` and ``libdevice`` from here. Without Triton they are
stand-ins: decorating works, launching a kernel says Triton is missing, and ``triton_op`` registers a
plain custom op (nothing can launch its kernel anyway). ``kernels.resolve_backend`` picks the torch
references then.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    AVAILABLE, WHY_MISSING = True, ""
except ImportError as e:       # no Triton (or a broken one): the torch references only
    AVAILABLE, WHY_MISSING = False, str(e)

    class _Missing:
        """Any attribute, call, subscript or decoration of Triton's API: raises once something
        would actually run a kernel."""

        def __getattr__(self, name: str) -> "_Missing":
            return self

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return self                       # @triton.jit
            if not args:
                return lambda fn: self            # @triton.jit(do_not_specialize=...)
            raise RuntimeError(f"the pdiff Triton kernels need Triton, which cannot be imported here "
                               f"({WHY_MISSING}); use train.kernels=torch (or auto)")

        def __getitem__(self, grid) -> "_Missing":
            return self

    triton = tl = libdevice = _Missing()

# torch.library.triton_op scans its function for Triton kernels; without Triton the op is a plain
# custom op with the same schema, fake and autograd registrations.
triton_op = torch.library.triton_op if AVAILABLE else torch.library.custom_op
