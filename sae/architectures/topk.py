"""TopK SAE (Gao et al. 2024): the k largest pre-activations of each token stay, the rest
are zero. Decoder rows are kept at unit norm (the gradient along each row is removed before
the step, rows renormalised after). Dead latents are revived by the AuxK loss: the k_aux
largest pre-activations among dead latents try to reconstruct the main model's residual.

Training runs through the sparse kernels of `sparse.py`: only the selected pairs enter the
backward pass.
"""

from typing import Any

import torch
from torch.nn import functional as F

from sae.architectures.base import (
    SaeConfig,
    SparseAutoencoder,
    StepOutput,
    checkpoint_k,
    fvu,
    pre_activations,
    register,
)
from sae.architectures.sparse import Selection, selected_pre_activations, sparse_decode
from sae.checkpoint import SaeWeights
from sae.errors import UserError


@register
class TopKSae(SparseAutoencoder):
    name = "topk"

    @classmethod
    def check_config(cls, config: SaeConfig) -> None:
        if not 1 <= config.k <= config.n_latents:
            raise UserError(
                f"--k {config.k} is out of range for {config.n_latents} latents: "
                f"use 1 <= k <= {config.n_latents}"
            )
        if config.k_aux is not None and config.k_aux < 1:
            raise UserError(f"k_aux {config.k_aux} is out of range: use at least 1")

    def select(self, pre: torch.Tensor) -> Selection:
        """The active (token, latent) pairs for dense pre-activations (tokens, n_latents)."""
        indices = pre.topk(self.config.k, dim=1, sorted=False).indices
        return Selection.from_topk(indices, self.config.n_latents)

    def observe_selection(self, values: torch.Tensor, selection: Selection) -> None:
        """Hook for architectures that learn statistics of their selections."""

    def step(
        self, x: torch.Tensor, total_variance: torch.Tensor, dead: torch.Tensor, progress: float
    ) -> StepOutput:
        with torch.no_grad():
            centered = x - self.b_dec
            pre = self.dense_pre_activations(centered)
            selection = self.select(pre)
        values = F.relu(
            selected_pre_activations(
                pre, centered, self.encoder_weight, self.encoder_bias, self.b_dec, selection
            )
        )
        error = x - (sparse_decode(values, self.W_dec, selection) + self.b_dec)
        reconstruction = fvu(error, total_variance)
        active = values.detach() > 0
        self.observe_selection(values.detach(), selection)
        fired = torch.zeros(self.config.n_latents, dtype=torch.bool, device=x.device)
        fired[selection.cols[active]] = True
        loss = reconstruction
        auxiliary = 0.0
        if bool(dead.any()):
            aux = self._auxk_loss(pre, centered, error.detach(), dead)
            loss = loss + self.config.aux_coefficient * aux
            auxiliary = float(aux.detach())
        return StepOutput(
            loss=loss,
            fvu=float(reconstruction.detach()),
            l0=float(active.sum()) / x.shape[0],
            auxiliary_loss=auxiliary,
            fired=fired,
        )

    def _auxk_loss(
        self, pre: torch.Tensor, centered: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor
    ) -> torch.Tensor:
        k_aux = self.config.k_aux or self.d_in // 2
        n_dead = int(dead.sum())
        with torch.no_grad():
            dead_only = pre.masked_fill(~dead, float("-inf"))
            indices = dead_only.topk(min(k_aux, n_dead), dim=1, sorted=False).indices
        selection = Selection.from_topk(indices, self.config.n_latents)
        values = F.relu(
            selected_pre_activations(
                pre, centered, self.encoder_weight, self.encoder_bias, self.b_dec, selection
            )
        )
        predicted = sparse_decode(values, self.W_dec, selection)
        variance = (residual - residual.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        # With fewer dead latents than k_aux the loss is down-weighted (as in Gao et al.).
        scale = min(n_dead / k_aux, 1.0)
        return scale * (predicted - residual).pow(2).sum() / variance

    def extra_cfg(self) -> dict[str, Any]:
        return {"k": self.config.k, "multi_topk": False, "skip_connection": False}

    @classmethod
    def encode(cls, weights: SaeWeights, x: torch.Tensor) -> torch.Tensor:
        pre = pre_activations(weights, x)
        top = pre.topk(checkpoint_k(weights.cfg), dim=1, sorted=False)
        return torch.zeros_like(pre).scatter_(1, top.indices, F.relu(top.values))
