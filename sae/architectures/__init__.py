"""SAE architectures behind a registry keyed by name (`topk`, `relu`, `batchtopk`,
`jumprelu`, `groupmax`), one module each. Later stages use `encode(weights, x)` /
`decode(weights, f)` on checkpoints loaded with `sae.checkpoint.load_sae`."""

from sae.architectures import batchtopk, groupmax, jumprelu, relu, topk
from sae.architectures.base import (
    REGISTRY,
    SaeConfig,
    SparseAutoencoder,
    StepOutput,
    architecture_of,
    auto_learning_rate,
    decode,
    encode,
    get_architecture,
    register,
)

__all__ = [
    "REGISTRY",
    "SaeConfig",
    "SparseAutoencoder",
    "StepOutput",
    "architecture_of",
    "auto_learning_rate",
    "batchtopk",
    "decode",
    "encode",
    "get_architecture",
    "groupmax",
    "jumprelu",
    "register",
    "relu",
    "topk",
]
