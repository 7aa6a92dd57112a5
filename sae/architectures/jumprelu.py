"""JumpReLU SAE (Rajamanoharan et al. 2024): a latent passes its pre-activation z when
z > theta_i (a learned per-latent threshold) and is zero otherwise; the penalty is the L0
norm itself. Neither the jump nor the step has a useful derivative in theta, so both use
straight-through estimators with a rectangle kernel of width `bandwidth`:
d/dtheta JumpReLU(z) = -(theta / eps) K((z - theta) / eps) and
d/dtheta H(z - theta) = -(1 / eps) K((z - theta) / eps), K(u) = 1 for |u| < 1/2.
The threshold is parametrised by its logarithm so it stays positive.

Short runs cannot wait for thresholds to climb from near zero (Adam moves log theta by about
the learning rate per step), so each latent's threshold starts at the value its
pre-activations exceed on k / n_latents of the first batch's tokens: training starts at
L0 ~ k with every latent firing, and the L0 penalty takes it from there.
"""

from typing import Any

import torch
from torch import nn
from torch.autograd.function import FunctionCtx
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

DEFAULT_SPARSITY_COEFFICIENT = 0.002
# Floor of the initial thresholds, for latents that barely respond to the first batch.
MIN_THRESHOLD = 1e-3


def _kernel(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float
    ) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth  # type: ignore[attr-defined]
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, threshold = ctx.saved_tensors  # type: ignore[attr-defined]
        kernel = _kernel(pre, threshold, ctx.bandwidth)  # type: ignore[attr-defined]
        grad_threshold = -(threshold * (kernel * grad).sum(dim=0))
        return grad * (pre > threshold), grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float
    ) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth  # type: ignore[attr-defined]
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, threshold = ctx.saved_tensors  # type: ignore[attr-defined]
        kernel = _kernel(pre, threshold, ctx.bandwidth)  # type: ignore[attr-defined]
        return None, -(kernel * grad).sum(dim=0), None


@register
class JumpReluSae(SparseAutoencoder):
    name = "jumprelu"

    def __init__(self, d_in: int, config: SaeConfig, seed: int) -> None:
        super().__init__(d_in, config, seed)
        self.log_threshold = nn.Parameter(torch.zeros(config.n_latents))

    @torch.no_grad()
    def initialise_from_data(self, x: torch.Tensor) -> None:
        pre = F.linear(x - self.b_dec, self.encoder_weight, self.encoder_bias)
        n_tokens = pre.shape[0]
        firing = min(n_tokens, max(1, round(n_tokens * self.config.k / self.config.n_latents)))
        threshold = pre.kthvalue(n_tokens - firing + 1, dim=0).values
        self.log_threshold.copy_(threshold.clamp_min(MIN_THRESHOLD).log())

    @classmethod
    def check_config(cls, config: SaeConfig) -> None:
        if config.bandwidth <= 0:
            raise UserError(f"JumpReLU bandwidth {config.bandwidth} must be positive")
        if not 1 <= config.k <= config.n_latents:
            raise UserError(
                f"--k {config.k} (the initial L0) is out of range for {config.n_latents} "
                f"latents: use 1 <= k <= {config.n_latents}"
            )
        if config.sparsity_coefficient is not None and config.sparsity_coefficient < 0:
            raise UserError(
                f"sparsity coefficient {config.sparsity_coefficient} is negative: use >= 0"
            )

    @property
    def sparsity_coefficient(self) -> float:
        value = self.config.sparsity_coefficient
        return DEFAULT_SPARSITY_COEFFICIENT if value is None else value

    def step(
        self, x: torch.Tensor, total_variance: torch.Tensor, dead: torch.Tensor, progress: float
    ) -> StepOutput:
        pre = F.linear(x - self.b_dec, self.encoder_weight, self.encoder_bias)
        threshold = self.log_threshold.exp()
        bandwidth = self.config.bandwidth
        latents = _JumpReLU.apply(pre, threshold, bandwidth)
        assert isinstance(latents, torch.Tensor)
        error = x - torch.addmm(self.b_dec, latents, self.W_dec)
        reconstruction = fvu(error, total_variance)
        step = _Step.apply(pre, threshold, bandwidth)
        assert isinstance(step, torch.Tensor)
        l0 = step.sum(dim=1).mean()
        weight = self.sparsity_coefficient * penalty_warmup(self.config, progress)
        active = latents.detach() != 0
        return StepOutput(
            loss=reconstruction + weight * l0,
            fvu=float(reconstruction.detach()),
            l0=float(l0.detach()),
            auxiliary_loss=float(l0.detach()),
            fired=active.any(dim=0),
        )

    def threshold_for_export(self) -> torch.Tensor | None:
        return self.log_threshold.detach().exp()

    def extra_cfg(self) -> dict[str, Any]:
        return {
            "sparsity_coefficient": self.sparsity_coefficient,
            "bandwidth": self.config.bandwidth,
        }

    @classmethod
    def encode(cls, weights: SaeWeights, x: torch.Tensor) -> torch.Tensor:
        if weights.threshold is None:
            raise UserError("JumpReLU checkpoint has no threshold tensor: it cannot encode")
        pre = pre_activations(weights, x)
        return F.relu(pre) * (pre > weights.threshold)
