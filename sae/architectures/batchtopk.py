"""BatchTopK SAE (Bussmann et al. 2024): the k x tokens largest activations of the whole
batch stay, so tokens can use more or fewer than k latents. For use outside training a
single threshold replaces the batch selection: latents fire when their pre-activation
exceeds it. The threshold is a running average of the smallest selected activation and is
saved as a per-latent `threshold` tensor (all equal), so a checkpoint encodes like JumpReLU.
"""

from typing import Any

import torch
from torch.nn import functional as F

from sae.architectures.base import SaeConfig, pre_activations, register
from sae.architectures.sparse import Selection
from sae.architectures.topk import TopKSae
from sae.checkpoint import SaeWeights
from sae.errors import UserError

# Weight of the newest batch in the running threshold estimate.
THRESHOLD_UPDATE = 0.01


@register
class BatchTopKSae(TopKSae):
    name = "batchtopk"
    running_threshold: torch.Tensor

    def __init__(self, d_in: int, config: SaeConfig, seed: int) -> None:
        super().__init__(d_in, config, seed)
        # Negative until the first batch has been seen.
        self.register_buffer("running_threshold", torch.tensor(-1.0))

    def select(self, pre: torch.Tensor) -> Selection:
        n_tokens, n_latents = pre.shape
        flat = F.relu(pre).flatten().topk(self.config.k * n_tokens, sorted=False).indices
        return Selection.from_flat(flat, n_tokens, n_latents)

    @torch.no_grad()
    def observe_selection(self, values: torch.Tensor, selection: Selection) -> None:
        positive = values[values > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min()
        if self.running_threshold < 0:
            self.running_threshold.copy_(smallest)
        else:
            self.running_threshold.lerp_(smallest, THRESHOLD_UPDATE)

    def threshold_for_export(self) -> torch.Tensor | None:
        value = self.running_threshold.clamp_min(0.0)
        return value.expand(self.config.n_latents).clone()

    def extra_cfg(self) -> dict[str, Any]:
        return {"k": self.config.k, "threshold": float(self.running_threshold.clamp_min(0.0))}

    @classmethod
    def encode(cls, weights: SaeWeights, x: torch.Tensor) -> torch.Tensor:
        if weights.threshold is None:
            raise UserError(
                "BatchTopK checkpoint has no threshold tensor: re-export it with its threshold"
            )
        pre = pre_activations(weights, x)
        return F.relu(pre) * (pre > weights.threshold)
