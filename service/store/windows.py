"""How an example window is stored: token ids as int32 and activations as float32 (or
float16), little-endian bytes in two columns of the `example` table."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def encode_window(
    token_ids: npt.ArrayLike, activations: npt.ArrayLike, half: bool = False
) -> tuple[bytes, bytes]:
    """Token ids as int32 and activations as float32 (float16 with `half`), little-endian."""
    tokens = np.asarray(token_ids, dtype="<i4")
    values = np.asarray(activations, dtype="<f2" if half else "<f4")
    if tokens.shape != values.shape or tokens.ndim != 1:
        raise ValueError("expected one activation per token of a 1-D window")
    return tokens.tobytes(), values.tobytes()


def decode_window(token_bytes: bytes, activation_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `encode_window`; the activations' width (2 or 4 bytes) follows from sizes."""
    tokens = np.frombuffer(token_bytes, dtype="<i4")
    width = len(activation_bytes) // max(len(tokens), 1)
    values = np.frombuffer(activation_bytes, dtype="<f2" if width == 2 else "<f4")
    return tokens.astype(np.int64), values.astype(np.float32)
