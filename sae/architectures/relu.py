"""ReLU SAE with an L1 penalty weighted by decoder row norms (Anthropic, "Towards
Monosemanticity" and its April 2024 update): loss = FVU + lambda * mean over tokens of
sum_i f_i ||W_dec_i||. Decoder rows are free in norm during training; `export` moves each
row's norm into the encoder (ReLU is positively homogeneous, so f_i ||d_i|| with the unit
row d_i / ||d_i|| reconstructs identically) and saves unit-norm decoder rows like the other
architectures.
"""

from typing import Any

import torch
from torch.nn import functional as F

from sae.architectures.base import (
    SaeConfig,
    SparseAutoencoder,
    StepOutput,
    fvu,
    penalty_warmup,
    pre_activations,
    register,
)
from sae.checkpoint import SaeWeights
from sae.errors import UserError

DEFAULT_L1_COEFFICIENT = 0.002


@register
class ReluSae(SparseAutoencoder):
    name = "relu"
    unit_norm_decoder = False

    @classmethod
    def check_config(cls, config: SaeConfig) -> None:
        if config.l1_coefficient is not None and config.l1_coefficient < 0:
            raise UserError(f"l1 coefficient {config.l1_coefficient} is negative: use >= 0")

    @property
    def l1_coefficient(self) -> float:
        value = self.config.l1_coefficient
        return DEFAULT_L1_COEFFICIENT if value is None else value

    def step(
        self, x: torch.Tensor, total_variance: torch.Tensor, dead: torch.Tensor, progress: float
    ) -> StepOutput:
        latents = F.relu(F.linear(x - self.b_dec, self.encoder_weight, self.encoder_bias))
        error = x - torch.addmm(self.b_dec, latents, self.W_dec)
        reconstruction = fvu(error, total_variance)
        l1 = (latents @ self.W_dec.norm(dim=1)).mean()
        loss = reconstruction + self.l1_coefficient * penalty_warmup(self.config, progress) * l1
        active = latents.detach() > 0
        return StepOutput(
            loss=loss,
            fvu=float(reconstruction.detach()),
            l0=float(active.sum()) / x.shape[0],
            auxiliary_loss=float(l1.detach()),
            fired=active.any(dim=0),
        )

    @torch.no_grad()
    def export(self, input_scale: float) -> SaeWeights:
        weights = super().export(input_scale)
        norms = weights.W_dec.norm(dim=1).clamp_min(1e-12)
        weights.encoder_weight *= norms[:, None]
        weights.encoder_bias *= norms
        weights.W_dec /= norms[:, None]
        weights.cfg["normalize_decoder"] = True
        return weights

    def extra_cfg(self) -> dict[str, Any]:
        return {"l1_coefficient": self.l1_coefficient}

    @classmethod
    def encode(cls, weights: SaeWeights, x: torch.Tensor) -> torch.Tensor:
        return F.relu(pre_activations(weights, x))
