"""Where the forward pass runs: device names, their availability, and the torch-kernel switch.

Device names (``device:`` in a run configuration, ``--device`` on the command line):

* ``cpu`` (default): the C kernels (dequantization, attention, RMS norm, SwiGLU) on the CPU;
* ``cpu-torch``: the CPU, but every op through its torch implementation (the code a GPU
  runs: :mod:`evalkit.formats.torch_dequant` for the weights, SDPA for attention), so the
  device path can be tested and compared on any machine;
* ``cuda``, ``cuda:N``, or another torch device type (``mps``, ``xpu``): the model's packed
  weights are copied to the device once and every op runs there in torch.

The environment variable ``EVALKIT_TORCH_KERNELS=1`` forces the torch implementations on
the CPU for the whole process, like ``cpu-torch``. This module imports torch only inside
the functions that need it, so configurations can be checked without it.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

from evalkit.errors import EvalkitError

__all__ = ["DEVICE_HELP", "DeviceError", "DeviceSpec", "check_device_name", "resolve_device", "torch_kernels",
           "torch_kernels_forced", "use_torch_kernels", "move_to_device", "TORCH_KERNELS_ENV"]

CPU, CPU_TORCH = "cpu", "cpu-torch"
TORCH_KERNELS_ENV = "EVALKIT_TORCH_KERNELS"
DEVICE_HELP = ("cpu (C kernels, the default), cpu-torch (the torch implementations on the CPU), "
               "cuda, cuda:N, or another torch device type (mps, xpu)")
_NAME = re.compile(r"[a-z][a-z0-9_]*(:[0-9]+)?")
_NOT_COMPUTE = {"meta"}          # torch device types that hold no data


class DeviceError(EvalkitError, ValueError):
    """A device name is malformed, or names a device this machine or this torch build lacks."""


@dataclass(frozen=True)
class DeviceSpec:
    """A resolved device: its name as configured, the torch device, and whether the torch
    implementations replace the C kernels (every non-CPU device, and ``cpu-torch``)."""

    name: str
    torch_device: str
    torch_kernels: bool

    @property
    def is_plain_cpu(self) -> bool:
        """True for ``cpu``: the C-kernel path, exactly as without a device setting."""
        return self.name == CPU


def check_device_name(name) -> str:
    """``name`` if it is a well-formed device name (availability is not checked), else DeviceError."""
    if not isinstance(name, str) or not (name == CPU_TORCH or _NAME.fullmatch(name)):
        raise DeviceError(f"device {name!r} is not a device name; use {DEVICE_HELP}")
    return name


def _unavailable(name: str, why: str) -> DeviceError:
    return DeviceError(f"device {name!r} is not available: {why} (use --device cpu, or device: cpu)")


def _check_cuda(name: str, index: int | None) -> None:
    import torch
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise _unavailable(name, f"this torch build ({torch.__version__}) has no CUDA support")
    if not torch.cuda.is_available():
        raise _unavailable(name, "torch sees no CUDA device (driver missing, or CUDA_VISIBLE_DEVICES empty)")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise _unavailable(name, f"this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")


def resolve_device(name: str) -> DeviceSpec:
    """The :class:`DeviceSpec` of ``name`` after checking that the device can be used here;
    DeviceError (a named error: the CLI exits 2 with its message) otherwise."""
    check_device_name(name)
    if name in (CPU, CPU_TORCH):
        return DeviceSpec(name, CPU, name == CPU_TORCH)
    import torch
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"device {name!r} is not a torch device type; use {DEVICE_HELP}") from None
    if dev.type == CPU:
        return DeviceSpec(CPU, CPU, False)
    if dev.type in _NOT_COMPUTE:
        raise DeviceError(f"device {name!r} holds no data; use {DEVICE_HELP}")
    if dev.type == "cuda":
        _check_cuda(name, dev.index)
    else:
        try:
            torch.zeros(1, device=dev).add_(1).cpu()        # probe: allocate, compute, copy back
        except Exception as e:  # noqa: BLE001 - any backend failure means "not usable here"
            raise _unavailable(name, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return DeviceSpec(name, str(dev), True)


# ----------------------------------------------------------------- torch-kernel switch

_forced_depth = 0


def torch_kernels_forced() -> bool:
    """True inside :func:`torch_kernels` or when ``EVALKIT_TORCH_KERNELS`` is set to 1/true/yes."""
    return _forced_depth > 0 or os.environ.get(TORCH_KERNELS_ENV, "").strip().lower() in ("1", "true", "yes")


@contextmanager
def torch_kernels(enabled: bool = True):
    """Within the block, evalkit's ops use their torch implementations on the CPU too
    (process-wide; nests). ``enabled=False`` is a no-op block, for callers that decide at run time."""
    global _forced_depth
    if not enabled:
        yield
        return
    _forced_depth += 1
    try:
        yield
    finally:
        _forced_depth -= 1


def use_torch_kernels(t) -> bool:
    """Whether an op on tensor ``t`` runs its torch implementation: off the CPU always, on it when forced."""
    return t.device.type != CPU or torch_kernels_forced()


def move_to_device(model, spec: DeviceSpec):
    """Copy ``model``'s tensors to ``spec``'s device once (in place; returns the model).

    Buffers that share storage (a tied embedding seen by both ``token_embd`` and ``output``)
    stay shared: each distinct CPU tensor is copied once. The model remembers ``spec``
    (``model.device_spec``) so that its forward callables know where to run.
    """
    if spec.torch_device != CPU:
        import torch
        # exact float32 GEMMs: never TensorFloat-32 (torch's default, made explicit here
        # because the process-wide setting may have been changed by other code)
        torch.set_float32_matmul_precision("highest")
        copies: dict[tuple, object] = {}
        for module in model.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                key = (buf.data_ptr(), tuple(buf.shape), tuple(buf.stride()), buf.dtype)
                if key not in copies:
                    copies[key] = buf.to(spec.torch_device)
                setattr(module, name, copies[key])
        model.to(spec.torch_device)                  # parameters, if a model has any
    model.device_spec = spec
    return model
