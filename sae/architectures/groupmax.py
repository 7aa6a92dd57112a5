"""GroupMax SAE (sparsify's `activation = "groupmax"`): the latents are split into k
contiguous groups of equal size and each token keeps the largest ReLU pre-activation of each
group, so exactly k latents are active per token, one per group. Trained like TopK (same
loss, AuxK revival, unit-norm decoder); only the choice of active latents differs.
"""

import torch
from torch.nn import functional as F

from sae.architectures.base import SaeConfig, checkpoint_k, pre_activations, register
from sae.architectures.sparse import Selection
from sae.architectures.topk import TopKSae
from sae.checkpoint import SaeWeights
from sae.errors import UserError


def group_max_indices(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, the index of the largest pre-activation of each of the k groups (tokens, k)."""
    group_size = pre.shape[1] // k
    within = pre.unflatten(1, (k, group_size)).argmax(dim=2)
    return within + torch.arange(0, pre.shape[1], group_size, device=pre.device)


@register
class GroupMaxSae(TopKSae):
    name = "groupmax"

    @classmethod
    def check_config(cls, config: SaeConfig) -> None:
        super().check_config(config)
        if config.n_latents % config.k:
            raise UserError(
                f"groupmax needs n_latents divisible by k ({config.n_latents} latents, "
                f"k {config.k}): change --n-latents or --k"
            )

    def select(self, pre: torch.Tensor) -> Selection:
        return Selection.from_topk(group_max_indices(pre, self.config.k), self.config.n_latents)

    @classmethod
    def encode(cls, weights: SaeWeights, x: torch.Tensor) -> torch.Tensor:
        k = checkpoint_k(weights.cfg)
        if weights.n_latents % k:
            raise UserError(
                f"groupmax checkpoint has {weights.n_latents} latents, not divisible by its "
                f"k {k}: the checkpoint is inconsistent"
            )
        pre = pre_activations(weights, x)
        indices = group_max_indices(pre, k)
        return torch.zeros_like(pre).scatter_(1, indices, F.relu(pre.gather(1, indices)))
