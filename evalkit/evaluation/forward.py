"""Forward callables: ``(B, C)`` chunk tokens → float32 logits of the scored rows ``(B, rows, V)``.

Anything that turns chunks into logits is a :data:`ForwardFn`: evalkit's exact model
(:class:`ModelForward`), and later an emulated backend or a model with swapped weights.
The evaluation loop (:mod:`evalkit.evaluation.loop`) only ever calls them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from evalkit.errors import EvalkitError, RunError
from evalkit.evaluation.window import ScoredWindow

__all__ = ["ForwardFactory", "ForwardFn", "ModelForward", "ModelLoadError", "configure_threads", "exact_forward",
           "load_model", "model_logits"]

ForwardFn = Callable[[np.ndarray], np.ndarray]
"""(B, C) integer chunk tokens → float32 logits of the scored rows, (B, n_rows, V).

The result may live in a buffer the callable reuses: use it before calling again."""

ForwardFactory = Callable[[Path, ScoredWindow, object], ForwardFn]
"""(model path, scored window, reusable logits buffer or None) → a forward callable."""


class ModelLoadError(RunError):
    """A model file or folder cannot be turned into a forward pass (message names the file)."""


def load_model(path: Path, device: str = "cpu"):
    """The exact float32 model of a GGUF file or a HuggingFace folder (named errors).

    ``device`` (:mod:`evalkit.devices`): ``cpu`` keeps the weights zero-copy in the file's
    memory map; any other device copies them there once. An unavailable device fails
    (DeviceError) before the model is read.
    """
    from evalkit.devices import move_to_device, resolve_device
    from evalkit.model import Model
    spec = resolve_device(device)
    try:
        model = Model.from_hf(path) if Path(path).is_dir() else Model.from_gguf(path)
    except EvalkitError:
        raise
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: {e}") from None
    return model if spec.is_plain_cpu else move_to_device(model, spec)


def _device_logits(model, chunks: np.ndarray, start: int, buffer, spec) -> np.ndarray:
    """:func:`model_logits` for a model on ``spec``'s device (or forced onto the torch kernels).

    The forward runs with that device as torch's default device, since the model allocates
    its activations (and the logits buffer) without naming one; the logits come back to the
    host as float32 numpy.
    """
    import torch
    from evalkit.devices import torch_kernels
    dev = torch.device(spec.torch_device)
    shape = (*chunks.shape[:-1], chunks.shape[-1] - start, model.config.n_vocab)
    # a buffer of its own per device: one Workspace may also serve CPU forwards (an emulated
    # backend's variant in the same run), which must not get a device tensor
    name = "logits" if dev.type == "cpu" else f"logits@{dev}"
    with torch.no_grad(), dev, torch_kernels(spec.torch_kernels):
        out = buffer(name, *shape) if buffer is not None else None
        z = model.forward(torch.from_numpy(chunks.astype(np.int64)).to(dev), logits_start=start, out=out)
        return z.numpy() if dev.type == "cpu" else z.cpu().numpy()


def model_logits(model, chunks: np.ndarray, start: int = 0, buffer=None) -> np.ndarray:
    """Float32 logits of positions start..C-1 of one chunk (C,) -> (C - start, V), or of
    several evaluated together (B, C) -> (B, C - start, V).

    With a ``buffer`` (an evalkit.model.Workspace) the result lives in its "logits"
    buffer, reused from call to call (fresh logits pages cost a quarter of the output
    projection's time): use it before the buffer's next call.
    """
    import torch
    spec = getattr(model, "device_spec", None)       # set by load_model / move_to_device
    if spec is not None and not spec.is_plain_cpu:
        return _device_logits(model, chunks, start, buffer, spec)
    shape = (*chunks.shape[:-1], chunks.shape[-1] - start, model.config.n_vocab)
    out = buffer("logits", *shape) if buffer is not None else None
    # no_grad rather than inference_mode: the model's reusable buffers must stay ordinary tensors
    with torch.no_grad():
        z = model.forward(torch.from_numpy(chunks.astype(np.int64)), logits_start=start, out=out)
    return z.numpy()


class ModelForward:
    """A loaded model as a forward callable; only the scored rows' logits are computed."""

    def __init__(self, model, window: ScoredWindow, buffer=None):
        self.model, self.window, self.buffer = model, window, buffer

    @property
    def n_vocab(self) -> int:
        """Width of the logits rows."""
        return self.model.config.n_vocab

    def __call__(self, chunks: np.ndarray) -> np.ndarray:
        """(B, C) tokens → (B, n_rows, V) logits of the scored rows (in the reused buffer)."""
        z = model_logits(self.model, chunks, self.window.first_row, self.buffer)
        return self.window.scored_rows(z)


def exact_forward(path: Path, window: ScoredWindow, buffer=None, device: str = "cpu") -> ModelForward:
    """The default forward factory of ``evalkit run``: evalkit's exact float32 model of ``path``
    (on ``device``; bind it with functools.partial for a run on another device)."""
    return ModelForward(load_model(path, device), window, buffer)


def configure_threads(threads: int | None) -> int:
    """Set torch's thread team (which the C kernels run on too) once, at an entry point.

    ``None`` keeps torch's default. Returns the thread count in effect.
    """
    import torch
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise RunError(f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
