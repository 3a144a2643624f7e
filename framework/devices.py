"""Devices read from the tensors themselves, host-to-device copies that do not stall the host, and
true float32 regions inside mixed-precision code."""
from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import torch
from torch import Tensor, nn


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (the CPU for a module holding neither).

    Lightning caches a LightningModule's device and refreshes the cache only when ``.to()``,
    ``.cuda()`` or ``.cpu()`` is called on a Lightning module above it. A LightningModule held by a
    plain module (a detector inside a torchmetrics ``Metric``) is moved by the parent's ``_apply``
    and keeps reporting its old device; its weights always know where they are.
    """
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device_async(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` (on the CPU) copied to ``device`` without waiting for the device.

    A plain host-to-GPU copy from pageable memory blocks the host until every queued kernel has
    finished; staging the values in pinned memory lets the copy join the stream's queue instead.
    """
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@contextlib.contextmanager
def float32_math() -> Iterator[None]:
    """Float32 arithmetic in true float32 for the block: autocast off on every device type, and no
    TF32 or bfloat16 shortcuts in matrix products and convolutions.

    Metrics, scores and statistics must not depend on the training precision or on the GPU:
    under ``bf16-mixed`` a matmul inside a metric would otherwise run in bfloat16, and on an
    Ampere or newer GPU a convolution in TF32 (10-bit mantissa).
    """
    matmul_precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                stack.enter_context(torch.autocast(device_type, enabled=False))
            yield
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
