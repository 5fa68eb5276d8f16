"""Where and at which precision a model runs: resolved here, once, for training and inference alike."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any


def resolve_device(device: str, precision: str, *, local: bool = True) -> tuple[str, str]:
    """``(device, precision)`` after resolving ``auto``: CUDA when present; bf16 on CUDA (fp16 without bf16).

    On the CPU ``auto`` precision is fp32. ``device="cpu"`` never imports torch, so a client that only
    schedules CPU work stays light. ``local=False`` (inference on a cluster): ``cuda`` is not checked here,
    since the client may run where the GPUs are not; the workers' GPU resources are checked instead.
    """
    if device == "cpu":
        return "cpu", "fp32" if precision == "auto" else precision
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and local and not torch.cuda.is_available():
        from geoseg.errors import ConfigError

        raise ConfigError("device: cuda asked for but torch sees no CUDA device; use device: auto or cpu")
    if precision == "auto":
        if device == "cuda":
            here = torch.cuda.is_available()
            precision = "bf16" if not here or torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    return device, precision


def autocast(device: str, precision: str) -> AbstractContextManager[Any]:
    """Torch autocast for ``precision`` (a no-op context for fp32)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None)
