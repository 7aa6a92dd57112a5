"""The edges of chosen rows of a graph stored by row (CSR: row i's edges are
indptr[i]:indptr[i + 1]), gathered without a loop over rows."""

from __future__ import annotations

import numpy as np


def row_edges(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positions of the edges of `rows`, row after row, and each row's edge count."""
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(int(counts.sum())), counts


def row_chunks(indptr: np.ndarray, rows: np.ndarray, limit: int) -> list[np.ndarray]:
    """`rows` in consecutive pieces of about `limit` edges at most (a row with more edges
    than that is a piece of its own)."""
    if rows.size == 0:
        return []
    ends = np.cumsum(indptr[rows + 1] - indptr[rows])
    cuts = np.searchsorted(ends, np.arange(limit, int(ends[-1]), limit), side="right")
    return [piece for piece in np.split(rows, np.unique(cuts)) if piece.size]
