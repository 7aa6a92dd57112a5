"""Maximum-cosine assignment between two sets of unit vectors, exact and sparse.

Both solvers take row-normalised float32 matrices `a` (p, d) and `b` (q, d) with p <= q and
return, for every row of `a`, the column of `b` it is assigned to, maximising the summed cosine.
Cosines are computed block by block (`block_rows` rows of `a` at a time), never the whole
matrix at once unless the exact solver needs it.

- `assign_exact`: the dense matrix in float64, solved by `lap.lapjv` (square) or SciPy's
  `linear_sum_assignment` (rectangular, or when `lap` is missing). Memory 8 * p * q bytes.
- `assign_sparse`: a candidate graph holding each row's and each column's `k` most similar
  partners plus the identity edges (i, i), which guarantee that a matching covering every row
  exists; SciPy's `min_weight_full_bipartite_matching` solves that graph exactly.
  Memory O((p + q) * k).

The sparse result comes with an upper bound on its gap to the dense optimum, from LP duality:
any column prices `v` (v >= 0 when columns may stay unmatched) give the bound
sum_i max_j (C_ij - v_j) + sum_j v_j. An edge left out of the graph has a cosine no larger than
min(r_i, s_j), the k-th largest cosine of its row and of its column, so the inner maximum is
bounded without the dense matrix. The prices come from the sparse problem's own optimal
duals (shortest paths in its residual graph) followed by a few coordinate-descent sweeps; the
bound is valid for any prices, their quality only makes it tighter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

try:
    import lap
except ImportError:  # pragma: no cover - lap is a declared dependency; SciPy is the fallback
    lap = None

Progress = Callable[[str, int, int], None]
"""Called as progress(stage, done, total) while blocks are processed."""

# Costs are 2 - cosine so every edge weight is >= 1 (cosines lie in [-1, 1]): no weight is
# ever zero, which sparse graph routines could confuse with a missing edge, and LAPJV is
# given non-negative costs, the case it is written for.
COST_SHIFT = 2.0

# Shortest-path sweeps used to find prices for the gap bound; the bound stays valid when
# the sweeps stop early, only looser.
MAX_PRICE_SWEEPS = 3000
DESCENT_SWEEPS = 20


@dataclass
class Assignment:
    """Row i of `a` goes to column `partner[i]` of `b` with cosine `cosine[i]`."""

    partner: np.ndarray  # int64 (p,)
    cosine: np.ndarray  # float64 (p,)
    objective: float  # sum of cosine
    solver: str  # "exact-lap", "exact-scipy" or "sparse"
    seconds: float
    gap_bound: float  # proven: optimum - objective <= gap_bound (0 for exact solvers)
    candidate_edges: int = 0  # edges in the sparse graph (0 for exact solvers)


def cosine_blocks(
    a: torch.Tensor, b: torch.Tensor, block_rows: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, a[start:start+block_rows] @ b.T) in float32, one block at a time.

    Every block is written into the same buffer (a fresh 0.5 GiB block per step would cost
    page faults on each): a block is only valid until the next one is requested."""
    bt = b.T
    buffer = torch.empty((min(block_rows, a.shape[0]), b.shape[0]), dtype=torch.float32)
    for start in range(0, a.shape[0], block_rows):
        rows = a[start : start + block_rows]
        block = buffer[: rows.shape[0]]
        torch.matmul(rows, bt, out=block)
        yield start, block


def _report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def assign_exact(
    a: torch.Tensor,
    b: torch.Tensor,
    block_rows: int = 1024,
    progress: Progress | None = None,
    stage: str = "cosines",
) -> Assignment:
    """Optimal assignment of every row of `a` (p <= q rows) from the dense cosine matrix."""
    started = time.perf_counter()
    p, q = a.shape[0], b.shape[0]
    cost = np.empty((p, q), dtype=np.float64)
    for start, block in cosine_blocks(a, b, block_rows):
        rows = cost[start : start + block.shape[0]]
        rows[:] = block.numpy()
        np.subtract(COST_SHIFT, rows, out=rows)
        _report(progress, stage, start + block.shape[0], p)
    if p == q and lap is not None:
        partner = np.asarray(lap.lapjv(cost, extend_cost=False, return_cost=False)[0], np.int64)
        solver = "exact-lap"
    else:
        rows_idx, cols_idx = linear_sum_assignment(cost)
        partner = np.empty(p, dtype=np.int64)
        partner[rows_idx] = cols_idx
        solver = "exact-scipy"
    cosine = COST_SHIFT - cost[np.arange(p), partner]
    return Assignment(
        partner=partner,
        cosine=cosine,
        objective=float(cosine.sum()),
        solver=solver,
        seconds=time.perf_counter() - started,
        gap_bound=0.0,
    )


@dataclass
class Candidates:
    """Each row's top-k columns and each column's top-k rows, with their cosines."""

    row_cols: torch.Tensor  # int64 (p, k_row)
    row_vals: torch.Tensor  # float32 (p, k_row), descending
    col_rows: torch.Tensor  # int64 (k_col, q)
    col_vals: torch.Tensor  # float32 (k_col, q)

    def row_cutoff(self, q: int) -> np.ndarray:
        """Upper bound on the cosine of any edge of a row outside its top-k (-inf if none)."""
        if self.row_vals.shape[1] >= q:
            return np.full(self.row_vals.shape[0], -np.inf)
        return self.row_vals[:, -1].double().numpy()

    def col_cutoff(self, p: int) -> np.ndarray:
        if self.col_vals.shape[0] >= p:
            return np.full(self.col_vals.shape[1], -np.inf)
        return self.col_vals.min(dim=0).values.double().numpy()


def _merge_columns(
    cand: Candidates, block: torch.Tensor, start: int, threshold: torch.Tensor
) -> None:
    """Fold the block's entries above each column's current k-th best into its top-k.

    After the first blocks few entries pass, so the work is one comparison over the block
    plus a top-k over short lines: each touched column's current top-k followed by its new
    entries (padded with -inf)."""
    k_col = cand.col_vals.shape[0]
    q = block.shape[1]
    flat = np.flatnonzero((block > threshold).numpy())
    if flat.size == 0:
        return
    order = np.argsort(flat % q, kind="stable")
    flat = flat[order]
    cols = flat % q
    first = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]])
    touched = cols[first]
    counts = np.diff(np.r_[first, cols.size])
    slot = np.repeat(np.arange(touched.size), counts)
    position = k_col + np.arange(cols.size) - first[slot]
    width = k_col + int(counts.max())
    col_vals, col_rows = cand.col_vals.numpy(), cand.col_rows.numpy()
    line_vals = np.full((touched.size, width), -np.inf, dtype=np.float32)
    line_rows = np.full((touched.size, width), -1, dtype=np.int64)
    line_vals[:, :k_col] = col_vals[:, touched].T
    line_rows[:, :k_col] = col_rows[:, touched].T
    line_vals[slot, position] = block.numpy().ravel()[flat]
    line_rows[slot, position] = flat // q + start
    best_vals, best_pos = torch.from_numpy(line_vals).topk(k_col, dim=1)
    col_vals[:, touched] = best_vals.numpy().T
    col_rows[:, touched] = np.take_along_axis(line_rows, best_pos.numpy(), axis=1).T
    threshold[torch.from_numpy(touched)] = best_vals[:, -1]


def top_candidates(
    a: torch.Tensor,
    b: torch.Tensor,
    k: int,
    block_rows: int = 1024,
    progress: Progress | None = None,
    stage: str = "candidates",
) -> Candidates:
    """One pass over the cosine matrix, block by block, keeping row and column top-k."""
    p, q = a.shape[0], b.shape[0]
    k_row, k_col = min(k, q), min(k, p)
    cand = Candidates(
        row_cols=torch.empty((p, k_row), dtype=torch.int64),
        row_vals=torch.empty((p, k_row)),
        col_rows=torch.full((k_col, q), -1, dtype=torch.int64),
        col_vals=torch.full((k_col, q), -torch.inf),
    )
    # The k-th best cosine seen so far in each column; only entries above it can enter.
    threshold = torch.full((q,), -torch.inf)
    rows_seen = 0
    for start, block in cosine_blocks(a, b, block_rows):
        vals, cols = block.topk(k_row, dim=1)
        cand.row_vals[start : start + block.shape[0]] = vals
        cand.row_cols[start : start + block.shape[0]] = cols
        if rows_seen < k_col:
            # Until every column has seen k rows, everything enters: merge densely.
            top = min(k_col, block.shape[0])
            new_vals, new_rows = block.topk(top, dim=0)
            all_vals = torch.cat([cand.col_vals, new_vals])
            all_rows = torch.cat([cand.col_rows, new_rows + start])
            cand.col_vals, pos = all_vals.topk(k_col, dim=0)
            cand.col_rows = all_rows.gather(0, pos)
            threshold = cand.col_vals[-1].clone()
        else:
            _merge_columns(cand, block, start, threshold)
        rows_seen += block.shape[0]
        _report(progress, stage, rows_seen, p)
    return cand


@dataclass
class CandidateGraph:
    """Deduplicated candidate edges (row, col, cosine), sorted by row then column."""

    rows: np.ndarray
    cols: np.ndarray
    cosine: np.ndarray
    shape: tuple[int, int]

    def matrix(self, values: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix((values, (self.rows, self.cols)), shape=self.shape)


def candidate_graph(a: torch.Tensor, b: torch.Tensor, cand: Candidates) -> CandidateGraph:
    """Union of row top-k, column top-k and identity edges (the fallback that makes a full
    matching always exist: row i can always take column i, as p <= q)."""
    p, q = a.shape[0], b.shape[0]
    k_row, k_col = cand.row_cols.shape[1], cand.col_rows.shape[0]
    identity = np.arange(p)
    identity_cos = (a * b[:p]).sum(dim=1).double().numpy()
    rows = np.concatenate(
        [np.repeat(identity, k_row), cand.col_rows.T.reshape(-1).numpy(), identity]
    )
    cols = np.concatenate(
        [cand.row_cols.reshape(-1).numpy(), np.repeat(np.arange(q), k_col), identity]
    )
    cosine = np.concatenate(
        [
            cand.row_vals.reshape(-1).double().numpy(),
            cand.col_vals.T.reshape(-1).double().numpy(),
            identity_cos,
        ]
    )
    # Keep the first copy of each edge: matrix-product values before the identity's dot
    # products, so an edge has one value whichever list it came from.
    _, first = np.unique(rows.astype(np.int64) * q + cols, return_index=True)
    return CandidateGraph(rows[first], cols[first], cosine[first], (p, q))


def _implicit_max(own_cutoff: np.ndarray, other_cutoff: np.ndarray, other_price: np.ndarray):
    """For each i: max_j min(own_cutoff[i], other_cutoff[j]) - other_price[j], in O(n log n).

    This bounds C_ij - price_j over the edges left out of the graph."""
    order = np.argsort(other_cutoff, kind="stable")
    cut_sorted = other_cutoff[order]
    price_sorted = other_price[order]
    with np.errstate(invalid="ignore"):
        below = np.maximum.accumulate(cut_sorted - price_sorted)
    above = np.maximum.accumulate((-price_sorted)[::-1])[::-1]
    split = np.searchsorted(cut_sorted, own_cutoff, side="right")
    best = np.full(own_cutoff.shape[0], -np.inf)
    has_below = split > 0
    best[has_below] = below[split[has_below] - 1]
    has_above = split < cut_sorted.shape[0]
    best[has_above] = np.maximum(best[has_above], own_cutoff[has_above] + above[split[has_above]])
    best[np.isnan(best)] = -np.inf
    return best


def _sparse_row_max(matrix: sp.csr_matrix, price: np.ndarray) -> np.ndarray:
    """max over stored entries of each row of C_ij - price_j (-inf for empty rows)."""
    out = np.full(matrix.shape[0], -np.inf)
    lengths = np.diff(matrix.indptr)
    nonempty = lengths > 0
    if nonempty.any():
        reduced = np.maximum.reduceat(
            matrix.data - price[matrix.indices], matrix.indptr[:-1][nonempty]
        )
        out[nonempty] = reduced
    return out


def _residual_prices(graph: CandidateGraph, partner: np.ndarray) -> np.ndarray:
    """Column prices from shortest paths in the residual graph of the optimal sparse matching.

    Jacobi Bellman-Ford with numpy: sweeps are vectorised, and the count of sweeps is the
    depth of the shortest-path tree (hundreds here), far below SciPy's node-by-node loop."""
    p, q = graph.shape
    cost = COST_SHIFT - graph.cosine
    matched = partner[graph.rows] == graph.cols
    # Nodes: rows 0..p-1, columns p..p+q-1, source p+q (edges of cost 1 to every column).
    src = np.concatenate([np.where(matched, graph.cols + p, graph.rows), np.full(q, p + q)])
    dst = np.concatenate([np.where(matched, graph.rows, graph.cols + p), np.arange(q) + p])
    weight = np.concatenate([np.where(matched, -cost, cost), np.ones(q)])
    order = np.argsort(dst, kind="stable")
    src, dst, weight = src[order], dst[order], weight[order]
    starts = np.flatnonzero(np.r_[True, dst[1:] != dst[:-1]])
    targets = dst[starts]
    dist = np.full(p + q + 1, np.inf)
    dist[p + q] = 0.0
    for _ in range(MAX_PRICE_SWEEPS):
        best = np.minimum.reduceat(dist[src] + weight, starts)
        improved = best < dist[targets] - 1e-12
        if not improved.any():
            break
        dist[targets[improved]] = best[improved]
    # Column dual in the min-cost form is dist - 1; the cosine-form price is its negation.
    return 1.0 - dist[p : p + q]


def gap_upper_bound(
    graph: CandidateGraph, cand: Candidates, partner: np.ndarray, objective: float
) -> float:
    """Proven upper bound on (dense optimum - objective) for the sparse solution `partner`."""
    p, q = graph.shape
    forward = graph.matrix(graph.cosine)
    backward = forward.T.tocsr()
    row_cut, col_cut = cand.row_cutoff(q), cand.col_cutoff(p)
    # With more columns than rows a column may stay unmatched, which forces prices >= 0.
    floor = 0.0 if q > p else -np.inf

    def row_duals(price: np.ndarray) -> np.ndarray:
        return np.maximum(_sparse_row_max(forward, price), _implicit_max(row_cut, col_cut, price))

    def col_prices(row_dual: np.ndarray) -> np.ndarray:
        best = np.maximum(
            _sparse_row_max(backward, row_dual), _implicit_max(col_cut, row_cut, row_dual)
        )
        return np.maximum(best, floor)

    best_bound = np.inf
    for price in (np.zeros(q), np.maximum(_residual_prices(graph, partner), floor)):
        row_dual = row_duals(price)
        for _ in range(DESCENT_SWEEPS):
            bound = row_dual.sum() + price.sum()
            best_bound = min(best_bound, bound)
            price = col_prices(row_dual)
            row_dual = row_duals(price)
        best_bound = min(best_bound, row_dual.sum() + price.sum())
    return max(0.0, float(best_bound) - objective)


def assign_sparse(
    a: torch.Tensor,
    b: torch.Tensor,
    k: int = 32,
    block_rows: int = 1024,
    progress: Progress | None = None,
    stage: str = "candidates",
) -> Assignment:
    """Optimal assignment within the top-k candidate graph, with a bound on the gap."""
    started = time.perf_counter()
    p = a.shape[0]
    cand = top_candidates(a, b, k, block_rows, progress, stage)
    graph = candidate_graph(a, b, cand)
    rows_idx, cols_idx = min_weight_full_bipartite_matching(graph.matrix(COST_SHIFT - graph.cosine))
    partner = np.empty(p, dtype=np.int64)
    partner[rows_idx] = cols_idx
    # Edges are sorted by row then column, so each matched edge is found by bisection.
    q = b.shape[0]
    keys = graph.rows.astype(np.int64) * q + graph.cols
    cosine = graph.cosine[np.searchsorted(keys, np.arange(p, dtype=np.int64) * q + partner)]
    objective = float(cosine.sum())
    return Assignment(
        partner=partner,
        cosine=cosine,
        objective=objective,
        solver="sparse",
        seconds=time.perf_counter() - started,
        gap_bound=gap_upper_bound(graph, cand, partner, objective),
        candidate_edges=int(graph.rows.shape[0]),
    )
