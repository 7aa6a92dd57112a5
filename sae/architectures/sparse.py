"""Sparse encoder/decoder kernels for SAEs whose latents are chosen by selection (TopK, BatchTopK).

Only a few latents per token are active, so the backward pass needs the gradient at those
(token, latent) pairs only. Autograd through a dense (tokens x latents) latent matrix would
spend a dense matrix product on every gradient; these functions spend work proportional to
the active pairs instead (sums over each latent's pairs for weight gradients, a sampled
product for the gradient of the values). `dense_reference_*` beside them compute the same
thing with plain autograd, and the tests check that both agree.

Active pairs are given as `Selection`: `rows` (token index, ascending) and `cols` (latent
index), one entry per pair, with `crow` the CSR row pointer (tokens + 1 entries).
"""

from dataclasses import dataclass
from functools import cached_property

import torch
from torch.autograd.function import FunctionCtx
from torch.nn import functional as F

from sae.sampled_product import sampled_product


@dataclass(frozen=True)
class Selection:
    """Active (token, latent) pairs of a batch, sorted by token."""

    rows: torch.Tensor
    cols: torch.Tensor
    crow: torch.Tensor
    n_tokens: int
    n_latents: int

    @classmethod
    def from_topk(cls, indices: torch.Tensor, n_latents: int) -> "Selection":
        """Pairs from per-token top-k indices of shape (tokens, k)."""
        n_tokens, k = indices.shape
        rows = torch.arange(n_tokens, device=indices.device).repeat_interleave(k)
        crow = torch.arange(0, n_tokens * k + 1, k, device=indices.device)
        return cls(rows, indices.reshape(-1), crow, n_tokens, n_latents)

    @classmethod
    def from_flat(cls, flat_indices: torch.Tensor, n_tokens: int, n_latents: int) -> "Selection":
        """Pairs from indices into the flattened (tokens, latents) matrix, any order."""
        flat = flat_indices.sort().values
        rows = torch.div(flat, n_latents, rounding_mode="floor")
        counts = torch.bincount(rows, minlength=n_tokens)
        crow = torch.zeros(n_tokens + 1, dtype=torch.int64, device=flat.device)
        crow[1:] = counts.cumsum(0)
        return cls(rows, flat - rows * n_latents, crow, n_tokens, n_latents)

    @cached_property
    def _by_latent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs' order sorted by latent (tokens ascending within one), and where each
        latent's pairs start in it (latents + 1 entries)."""
        order = torch.argsort(self.cols, stable=True)
        starts = torch.zeros(self.n_latents + 1, dtype=torch.int64, device=self.cols.device)
        starts[1:] = torch.bincount(self.cols, minlength=self.n_latents).cumsum(0)
        return order, starts

    def latent_sums(self, values: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
        """(latents, d): for each latent, the sum over its pairs of value * per_token[token],
        i.e. the (latents x tokens) matrix holding `values` at the pairs times `per_token`.
        One pass over the pairs grouped by latent (an embedding bag), with no sparse matrix
        built and no dense output cleared first: several times faster than `sparse.mm`."""
        order, starts = self._by_latent
        return F.embedding_bag(
            self.rows[order],
            per_token,
            starts,
            mode="sum",
            per_sample_weights=values[order],
            include_last_offset=True,
        )


class _SelectedPreActivations(torch.autograd.Function):
    """Encoder pre-activations at the selected pairs, read from a dense matrix computed
    without autograd; the backward produces the encoder's gradients from the pairs alone."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        pre_activations: torch.Tensor,
        centered: torch.Tensor,
        encoder_weight: torch.Tensor,
        encoder_bias: torch.Tensor,
        b_dec: torch.Tensor,
        selection: Selection,
    ) -> torch.Tensor:
        ctx.save_for_backward(centered, encoder_weight)
        ctx.selection = selection  # type: ignore[attr-defined]
        # Pre-activations computed in bfloat16 are exact in the weights' float32.
        return pre_activations[selection.rows, selection.cols].to(encoder_weight.dtype)

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad: torch.Tensor
    ) -> tuple[None, None, torch.Tensor, torch.Tensor, torch.Tensor, None]:
        centered, encoder_weight = ctx.saved_tensors  # type: ignore[attr-defined]
        selection: Selection = ctx.selection  # type: ignore[attr-defined]
        grad_bias = torch.zeros_like(encoder_weight[:, 0]).index_add_(0, selection.cols, grad)
        grad_weight = selection.latent_sums(grad, centered)
        # pre = W (x - b_dec) + b, so d/d b_dec sums -W[latent] over the pairs: -grad_bias @ W.
        grad_b_dec = -(grad_bias @ encoder_weight)
        return None, None, grad_weight, grad_bias, grad_b_dec, None


class _SparseDecode(torch.autograd.Function):
    """Sum of decoder rows weighted by the selected values, per token (no bias)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, values: torch.Tensor, W_dec: torch.Tensor, selection: Selection
    ) -> torch.Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.selection = selection  # type: ignore[attr-defined]
        return F.embedding_bag(
            selection.cols,
            W_dec,
            selection.crow,
            mode="sum",
            per_sample_weights=values,
            include_last_offset=True,
        )

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        values, W_dec = ctx.saved_tensors  # type: ignore[attr-defined]
        selection: Selection = ctx.selection  # type: ignore[attr-defined]
        # d/d value(t, j) = W_dec[j] . grad[t]: the product grad @ W_dec.T sampled at the pairs.
        grad_values = sampled_product(grad, W_dec, selection.crow, selection.cols)
        grad_W_dec = selection.latent_sums(values, grad)
        return grad_values, grad_W_dec, None


def selected_pre_activations(
    pre_activations: torch.Tensor,
    centered: torch.Tensor,
    encoder_weight: torch.Tensor,
    encoder_bias: torch.Tensor,
    b_dec: torch.Tensor,
    selection: Selection,
) -> torch.Tensor:
    """Pre-activations (pairs,) at `selection`, differentiable in the encoder and b_dec.

    `pre_activations` = `centered @ encoder_weight.T + encoder_bias`, computed without
    autograd (in float32 or bfloat16); `centered` = x - b_dec, also without autograd.
    """
    result = _SelectedPreActivations.apply(
        pre_activations, centered, encoder_weight, encoder_bias, b_dec, selection
    )
    assert isinstance(result, torch.Tensor)
    return result


def sparse_decode(values: torch.Tensor, W_dec: torch.Tensor, selection: Selection) -> torch.Tensor:  # noqa: N803
    """(tokens, d) reconstruction without bias from the values (pairs,) at `selection`."""
    result = _SparseDecode.apply(values, W_dec, selection)
    assert isinstance(result, torch.Tensor)
    return result


def dense_reference_pre_activations(
    x: torch.Tensor,
    encoder_weight: torch.Tensor,
    encoder_bias: torch.Tensor,
    b_dec: torch.Tensor,
    selection: Selection,
) -> torch.Tensor:
    """Plain-autograd counterpart of `selected_pre_activations` (for tests)."""
    pre = (x - b_dec) @ encoder_weight.T + encoder_bias
    return pre[selection.rows, selection.cols]


def dense_reference_decode(
    values: torch.Tensor,
    W_dec: torch.Tensor,  # noqa: N803
    selection: Selection,
) -> torch.Tensor:
    """Plain-autograd counterpart of `sparse_decode` (for tests)."""
    dense = torch.zeros(
        selection.n_tokens, selection.n_latents, dtype=values.dtype, device=values.device
    ).index_put((selection.rows, selection.cols), values)
    return dense @ W_dec
