"""evalkit's custom ops, and calling them: straight into their bodies in plain eager code.

Every op is a ``torch.library.custom_op`` (with a fake kernel), so torch.compile, FakeTensor
tracing and ``opcheck`` see it as one op. Called through the dispatcher, though, a custom op's
first call imports ``torch._dynamo`` (its wrapper is marked "don't compile"): ~70 MB of RSS
and about a second, for nothing in an eager forward. :func:`call` therefore runs the op's body
itself when nothing could intercept the call — not compiling, no dispatch or function mode
(FakeTensorMode, a ``with torch.device(...)`` block), no functorch transform, plain tensors,
none requiring grad — which is exactly what the dispatcher would have run; anything else goes
through ``torch.ops.evalkit``.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["call", "evalkit_op"]

_BODIES: dict[str, Callable] = {}


def evalkit_op(name: str, mutates_args: Iterable[str] = ()):
    """Decorator: register ``fn`` as the custom op ``evalkit::<name>`` and keep its body for :func:`call`."""
    def register(fn: Callable):
        _BODIES[name] = fn
        return torch.library.custom_op(f"evalkit::{name}", fn, mutates_args=tuple(mutates_args))
    return register


def _plain_eager(args: tuple) -> bool:
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() \
            or torch._C._len_torch_function_stack() or torch._C._are_functorch_transforms_active():
        return False
    grad = torch.is_grad_enabled()
    return all(type(a) is torch.Tensor and not (grad and a.requires_grad)
               for a in args if isinstance(a, torch.Tensor))


def call(name: str, *args):
    """``torch.ops.evalkit.<name>(*args)``, without the dispatcher where that changes nothing."""
    if _plain_eager(args):
        return _BODIES[name](*args)
    return getattr(torch.ops.evalkit, name)(*args)
