"""Which floating-point type runs the heavy matrix products fastest on this machine.

bfloat16 pays off on CPUs with AMX or AVX-512 BF16 units (several times float32's rate) and
costs time where it is emulated; the answer is timed once per process on products of the
shapes this project runs (an 8,192-latent scan block, an SAE encoder batch), not guessed from
CPU flags. On CUDA both training and the candidate scan decide by the device alone.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

# bfloat16 is chosen only when a timed product runs at least this much faster.
BFLOAT16_GAIN = 1.2


def product_seconds(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype) -> float:
    """Best of 3 timings of `left @ right.T` in `dtype`, after one that warms the kernel up."""
    import torch

    x, y = left.to(dtype), right.to(dtype)
    out = torch.empty((x.shape[0], y.shape[0]), dtype=dtype, device=x.device)
    seconds = []
    for _ in range(4):
        started = time.perf_counter()
        torch.matmul(x, y.T, out=out)
        seconds.append(time.perf_counter() - started)
    return min(seconds[1:])


@functools.cache
def bfloat16_is_faster() -> bool:
    """Whether this CPU multiplies bfloat16 matrices BFLOAT16_GAIN times faster than float32:
    true with AMX or AVX-512 BF16 units, false where bfloat16 is emulated. Timed on products
    of a scan block's shape (1/4 s in all), once per process."""
    import torch

    gen = torch.Generator().manual_seed(0)
    left, right = torch.randn(256, 576, generator=gen), torch.randn(4096, 576, generator=gen)
    bfloat16 = product_seconds(left, right, torch.bfloat16)
    return BFLOAT16_GAIN * bfloat16 < product_seconds(left, right, torch.float32)


# Configs name it without importing torch: torch is imported where a dtype is decided.
Precision = Literal["auto", "float32", "bfloat16"]


def compute_dtype(precision: Precision, device_type: str = "cpu") -> torch.dtype:
    """The dtype of training's heavy products for `precision` on a device of `device_type`
    (cpu or cuda): `auto` is bfloat16 on a GPU that has it and where this CPU multiplies it
    measurably faster, float32 elsewhere."""
    import torch

    if precision == "auto":
        on_gpu = device_type == "cuda"
        faster = torch.cuda.is_bf16_supported() if on_gpu else bfloat16_is_faster()
        return torch.bfloat16 if faster else torch.float32
    return torch.bfloat16 if precision == "bfloat16" else torch.float32
