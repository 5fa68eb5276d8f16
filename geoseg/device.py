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


#: Least share of validation pixels a model must classify alike in bf16 and fp32 for ``auto`` to pick bf16.
BF16_AGREEMENT = 0.999


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX-512 BF16): bf16 convolutions run ~4x fp32 there."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def auto_cpu_precision(checks: dict[str, Any]) -> str:
    """``precision: auto`` on the CPU: bf16 where the CPU computes it natively and the model passed the guard.

    ``checks`` is the checkpoint's ``provenance.precision_check`` (written by ``geoseg train``): the share of
    validation pixels classified alike in bf16 and fp32 must reach :data:`BF16_AGREEMENT`. A model without
    that record (trained elsewhere) stays fp32.
    """
    agreement = checks.get("bf16_agreement") if isinstance(checks, dict) else None
    if cpu_has_bf16() and isinstance(agreement, (int, float)) and agreement >= BF16_AGREEMENT:
        return "bf16"
    return "fp32"


def reduced_dtype(precision: str) -> Any:
    """The torch dtype of a reduced ``precision`` (bf16, fp16); None for fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(device: str, precision: str) -> AbstractContextManager[Any]:
    """Torch autocast for ``precision`` (a no-op context for fp32)."""
    import torch

    dtype = reduced_dtype(precision)
    return torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None)
