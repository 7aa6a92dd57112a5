"""What every SAE architecture shares: its config, the registry keyed by name, the module
base class that training drives, and `encode` / `decode` for checkpoints loaded off disk.

An architecture is one module in this package that subclasses `SparseAutoencoder` and
decorates it with `@register`; nothing else needs to change to add one.

Every SAE works on `x - b_dec` (the pre-encoder bias) and is trained on inputs multiplied by
a scale `c` chosen from the data (see `sae.train`). `export` folds that scale into the saved
tensors, so a checkpoint maps raw activations to latents with no side information:
with x' = c x, pre' = W (x' - b) + e = c (W (x - b / c) + e / c), so saving b_dec / c,
encoder bias / c and thresholds / c gives latents a / c and the reconstruction
W_dec a / c + b_dec / c = x_hat' / c. Encoder and decoder directions are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn import functional as F

from sae.checkpoint import SaeWeights
from sae.errors import UserError


class SaeConfig(BaseModel):
    """Hyperparameters of one SAE; the fields an architecture does not use are ignored."""

    model_config = ConfigDict(extra="forbid")

    architecture: str = Field(
        default="topk",
        description="SAE architecture: topk, batchtopk, relu, jumprelu, groupmax",
    )
    n_latents: int = Field(default=4608, description="latents per SAE")
    k: int = Field(default=32, description="active latents per token (topk, batchtopk)")
    k_aux: int | None = None
    aux_coefficient: float = 1 / 32
    l1_coefficient: float | None = Field(default=None, description="relu: L1 penalty weight")
    sparsity_coefficient: float | None = Field(
        default=None, description="jumprelu: L0 penalty weight"
    )
    bandwidth: float = 0.01
    penalty_warmup_fraction: float = 0.05

    @model_validator(mode="after")
    def _check(self) -> SaeConfig:
        if self.n_latents < 1:
            raise UserError(f"--latents {self.n_latents} is out of range: use at least 1")
        get_architecture(self.architecture).check_config(self)
        return self


def _architecture_error(name: str) -> UserError:
    known = ", ".join(sorted(REGISTRY))
    return UserError(f"unknown SAE architecture '{name}': use one of {known}")


REGISTRY: dict[str, type[SparseAutoencoder]] = {}
ArchitectureClass = TypeVar("ArchitectureClass", bound="type[SparseAutoencoder]")


def register(cls: ArchitectureClass) -> ArchitectureClass:
    """Class decorator: make an architecture available under its `name`."""
    REGISTRY[cls.name] = cls
    return cls


def get_architecture(name: str) -> type[SparseAutoencoder]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise _architecture_error(name) from None


@dataclass
class StepOutput:
    """What one seed's SAE reports for one training batch."""

    loss: torch.Tensor
    fvu: float
    l0: float
    auxiliary_loss: float
    fired: torch.Tensor  # (n_latents,) bool: latents active on at least one token


class SparseAutoencoder(nn.Module):
    """One SAE during training, in sparsify's orientation (latent-major weight matrices).

    Init: encoder rows are random unit vectors from the seed's own generator, the decoder
    starts as their copy (encoder transposed, in the usual x @ W_enc convention), biases zero
    until the trainer sets `b_dec` from the data.
    """

    name: ClassVar[str]
    unit_norm_decoder: ClassVar[bool] = True
    # dtype of the dense encoder product that picks the active latents (`dense_pre_activations`);
    # the trainer sets it from its config's precision.
    selection_dtype: torch.dtype = torch.float32

    def __init__(self, d_in: int, config: SaeConfig, seed: int) -> None:
        super().__init__()
        self.config = config
        self.d_in = d_in
        generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(config.n_latents, d_in, generator=generator)
        directions /= directions.norm(dim=1, keepdim=True)
        self.encoder_weight = nn.Parameter(directions.clone())
        self.encoder_bias = nn.Parameter(torch.zeros(config.n_latents))
        self.W_dec = nn.Parameter(directions.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @torch.no_grad()
    def dense_pre_activations(self, centered: torch.Tensor) -> torch.Tensor:
        """Every latent's pre-activation for (x - b_dec), without autograd, computed and
        returned in `selection_dtype`: in bfloat16 the product runs several times faster on
        CPUs with bfloat16 units, and the values differ by its rounding (2^-9 relative). A
        bfloat16 value is exact in float32, so the latents picked from it are those its
        float32 copy would give, without writing that copy."""
        dtype = self.selection_dtype
        if dtype == torch.float32:
            # F.linear, not addmm: addmm first copies the broadcast bias into the output.
            return F.linear(centered, self.encoder_weight, self.encoder_bias)
        weight, bias = self.encoder_weight.to(dtype), self.encoder_bias.to(dtype)
        return F.linear(centered.to(dtype), weight, bias)

    @classmethod
    def check_config(cls, config: SaeConfig) -> None:
        """Raise UserError for hyperparameters this architecture cannot train with."""

    def step(
        self, x: torch.Tensor, total_variance: torch.Tensor, dead: torch.Tensor, progress: float
    ) -> StepOutput:
        """Loss on a batch x (tokens, d_in); `dead` marks latents idle for too long;
        `progress` is the fraction of training done (for penalty warm-ups)."""
        raise NotImplementedError

    def initialise_from_data(self, x: torch.Tensor) -> None:
        """Set data-dependent parameters from the first (scaled) batch, after b_dec."""

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of each decoder row's gradient along the row (rows stay unit norm)."""
        grad = self.W_dec.grad
        if self.unit_norm_decoder and grad is not None:
            parallel = torch.linalg.vecdot(grad, self.W_dec).unsqueeze(1)
            grad.addcmul_(parallel, self.W_dec, value=-1)

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def extra_cfg(self) -> dict[str, Any]:
        """Architecture keys written to cfg.json beside the common ones."""
        return {}

    def threshold_for_export(self) -> torch.Tensor | None:
        """Per-latent thresholds in training (scaled-input) units, or None."""
        return None

    @torch.no_grad()
    def export(self, input_scale: float) -> SaeWeights:
        """Weights for raw (unscaled) activations, on the CPU; see the module docstring for
        the fold."""
        threshold = self.threshold_for_export()
        cfg = {
            "architecture": self.name,
            "d_in": self.d_in,
            "num_latents": self.config.n_latents,
            "normalize_decoder": self.unit_norm_decoder,
            "input_scale_folded": input_scale,
            **self.extra_cfg(),
        }
        return SaeWeights(
            encoder_weight=self.encoder_weight.detach().to("cpu", copy=True),
            encoder_bias=(self.encoder_bias.detach() / input_scale).cpu(),
            W_dec=self.W_dec.detach().to("cpu", copy=True),
            b_dec=(self.b_dec.detach() / input_scale).cpu(),
            cfg=cfg,
            threshold=None if threshold is None else (threshold.detach() / input_scale).cpu(),
        )

    @classmethod
    def encode(cls, weights: SaeWeights, x: torch.Tensor) -> torch.Tensor:
        """Latent activations (tokens, n_latents) of raw activations x (tokens, d_in)."""
        raise NotImplementedError


def fvu(error: torch.Tensor, total_variance: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: squared error over the batch's total variance."""
    return error.pow(2).sum() / total_variance


def total_variance(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)


def penalty_warmup(config: SaeConfig, progress: float) -> float:
    """Sparsity penalties ramp up linearly over the first part of training."""
    if config.penalty_warmup_fraction <= 0:
        return 1.0
    return min(1.0, progress / config.penalty_warmup_fraction)


def pre_activations(weights: SaeWeights, x: torch.Tensor) -> torch.Tensor:
    """Encoder pre-activations of a loaded checkpoint, honouring SAELens's b_dec switch."""
    x = x.to(weights.encoder_weight.dtype)
    if weights.cfg.get("apply_b_dec_to_input", True):
        x = x - weights.b_dec
    return F.linear(x, weights.encoder_weight, weights.encoder_bias)


def architecture_of(cfg: dict[str, Any]) -> str:
    """Architecture name of a checkpoint config; sparsify's own configs name none and give
    their `activation` (topk or groupmax) instead."""
    name = cfg.get("architecture")
    if name is None:
        if "activation" in cfg:
            name = cfg["activation"]
        elif "k" in cfg:
            return "topk"
        else:
            raise UserError(
                "checkpoint cfg.json names no architecture and has no k: add "
                f'"architecture" (one of {", ".join(sorted(REGISTRY))})'
            )
    if name not in REGISTRY:
        raise _architecture_error(str(name))
    return str(name)


def checkpoint_k(cfg: dict[str, Any]) -> int:
    """k of a TopK-style checkpoint (ours and sparsify: `k`; older SAELens: in kwargs)."""
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if not isinstance(k, int) or k < 1:
        raise UserError(f'checkpoint cfg.json has no valid k (found {k!r}): add "k": <int>')
    return k


def encode(weights: SaeWeights, x: torch.Tensor) -> torch.Tensor:
    """Latent activations (tokens, n_latents) of raw activations x (tokens, d_in) under a
    checkpoint loaded with `sae.checkpoint.load_sae`, for every registered architecture."""
    normalisation = weights.cfg.get("normalize_activations")
    if normalisation not in (None, "none"):
        raise UserError(
            f"checkpoint was trained with SAELens activation normalisation '{normalisation}', "
            "whose scale factor is not saved in it: fold the factor into the weights first"
        )
    if x.shape[-1] != weights.d_in:
        raise UserError(
            f"activations have width {x.shape[-1]} but the SAE expects d_in {weights.d_in}: "
            "use the hookpoint the SAE was trained on"
        )
    return get_architecture(architecture_of(weights.cfg)).encode(weights, x)


def decode(weights: SaeWeights, latents: torch.Tensor) -> torch.Tensor:
    """Reconstruction (tokens, d_in) from latent activations (tokens, n_latents)."""
    return torch.addmm(weights.b_dec, latents.to(weights.W_dec.dtype), weights.W_dec)


def auto_learning_rate(n_latents: int) -> float:
    """Adam learning rate scaled with the SAE's width by the 1/sqrt(n) law of Gao et al.,
    at 5x their constant (2e-4 at 2^14 latents): their constant suits runs of billions of
    tokens; over one epoch of ~0.5M SmolLM2 tokens (1,152 latents, k 32, batch 1,024) it
    left FVU at 0.35 where 5x reached 0.30 (bench numbers in the train issue's report)."""
    return 1e-3 / math.sqrt(n_latents / 2**14)
