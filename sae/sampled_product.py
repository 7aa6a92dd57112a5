"""Chosen entries of a matrix product, one dot product each (a sampled product, SDDMM).

Both the SAE's backward pass (the gradient at each active pair) and the matcher's float32
rescoring of candidate lists want `left @ right.T` at a few entries per row. torch's
`sampled_addmm` computes them from the rows in place: no copy of `right`'s rows per entry
(a gather and a batched product cost about four times as much on a CPU, and page faults
besides), the same float32 value for an entry whichever operand is on the left, and the same
value on every call.
"""

from __future__ import annotations

import warnings

import torch


def sampled_product(
    left: torch.Tensor, right: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """left[i] . right[cols[e]] for each entry e of row i (entries crow[i]:crow[i + 1], as in
    a CSR matrix), in left's dtype: shape (entries,)."""
    with warnings.catch_warnings():
        # torch warns once that CSR support is "beta"; the two ops used here are stable.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
        pattern = torch.sparse_csr_tensor(
            crow,
            cols,
            torch.zeros(cols.shape[0], dtype=left.dtype, device=left.device),
            (left.shape[0], right.shape[0]),
            check_invariants=False,
        )
    return torch.sparse.sampled_addmm(pattern, left, right.T, beta=0.0).values()
