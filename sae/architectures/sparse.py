"""Sparse encoder/decoder kernels for SAEs whose latents are chosen by selection (TopK, BatchTopK).

Only a few latents per token are active, so the backward pass needs the gradient at those
(token, latent) pairs only. Autograd through a dense (tokens x latents) latent matrix would
spend a dense matrix product on every gradient; these functions spend work proportional to
the active pairs instead (sparse products for weight gradients, a sampled product for the
gradient of the values). `dense_reference_*` beside them compute the same thing with plain
autograd, and the tests check that both agree.

Active pairs are given as `Selection`: `rows` (token index, ascending) and `cols` (latent
index), one entry per pair, with `crow` the CSR row pointer (tokens + 1 entries).
"""

import warnings
from dataclasses import dataclass

import torch
from torch.autograd.function import FunctionCtx
from torch.nn import functional as F


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

    def transposed(self, values: torch.Tensor) -> torch.Tensor:
        """(latents x tokens) sparse matrix holding `values` at the pairs."""
        return torch.sparse_coo_tensor(
            torch.stack([self.cols, self.rows]),
            values,
            (self.n_latents, self.n_tokens),
            check_invariants=False,
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
        return pre_activations[selection.rows, selection.cols]

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad: torch.Tensor
    ) -> tuple[None, None, torch.Tensor, torch.Tensor, torch.Tensor, None]:
        centered, encoder_weight = ctx.saved_tensors  # type: ignore[attr-defined]
        selection: Selection = ctx.selection  # type: ignore[attr-defined]
        grad_bias = torch.zeros_like(encoder_weight[:, 0]).index_add_(0, selection.cols, grad)
        grad_weight = torch.sparse.mm(selection.transposed(grad), centered)
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
        with warnings.catch_warnings():
            # torch warns once that CSR support is "beta"; the two ops used here are stable.
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
            pattern = torch.sparse_csr_tensor(
                selection.crow,
                selection.cols,
                torch.zeros_like(values),
                (selection.n_tokens, selection.n_latents),
                check_invariants=False,
            )
        # d/d value(t, j) = W_dec[j] . grad[t]: the product grad @ W_dec.T sampled at the pairs.
        grad_values = torch.sparse.sampled_addmm(pattern, grad, W_dec.T).values()
        grad_W_dec = torch.sparse.mm(selection.transposed(values), grad)
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
    autograd; `centered` = x - b_dec, also without autograd.
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
