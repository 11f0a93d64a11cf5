"""Triton kernels of the fast path, each beside the plain PyTorch reference it is pinned to.

Every public function takes ``impl``: ``"triton"`` runs the kernel (CUDA tensors, or CPU tensors under Triton's
interpreter, ``TRITON_INTERPRET=1``), ``"torch"`` runs the reference, ``"auto"`` picks the kernel for CUDA tensors
when Triton is importable and the reference otherwise. The ``torch.ops.sana.*`` custom ops wrap the ``auto`` choice
so ``torch.compile`` treats each kernel as one opaque node.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (set before Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for ``impl`` in (auto, triton, torch)."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be auto, triton or torch, not {impl!r}")
    if impl != "auto":
        return impl
    on_gpu = all(t.is_cuda for t in tensors)
    if triton_available() and (on_gpu or interpreting()):
        return "triton"
    return "torch"
