"""Maximum-cosine assignment between two sets of unit vectors, exact and sparse.

Both solvers take row-normalised float32 matrices `a` (p, d) and `b` (q, d) with p <= q and
return, for every row of `a`, the column of `b` it is assigned to, maximising the summed cosine.
Cosines are computed block by block (`block_rows` rows of `a` at a time), never the whole
matrix at once unless the exact solver needs it.

- `assign_exact`: the dense matrix in float64, solved by `lap.lapjv` (square) or SciPy's
  `linear_sum_assignment` (rectangular, or when `lap` is missing). Memory 8 * p * q bytes.
- `assign_sparse`: a candidate graph holding each row's and each column's `k` most similar
  partners and the rest of its rescored list (2k by scanned value), plus the identity edges
  (i, i), which guarantee that a matching covering every row exists; SciPy's
  `min_weight_full_bipartite_matching` solves that graph exactly, warm-started from an
  auction's prices (`sae.matching.auction`) and, once the graph is widened, from the last
  optimum's duals. Memory O((p + q) * k).

The sparse result comes with an upper bound on its gap to the dense optimum, from LP duality:
any column prices `v` (v >= 0 when columns may stay unmatched) give the bound
sum_i max_j (C_ij - v_j) + sum_j v_j. An edge left out of the graph has a cosine no larger than
min(r_i, s_j), its row's and its column's cutoff (the least of the k-th largest cosine and
the rescored list's bound from the scan), so the inner maximum is bounded without the dense
matrix. The prices come from the sparse problem's own optimal duals (shortest paths in its
residual graph) followed by a few coordinate-descent sweeps; the bound is valid for any
prices, their quality only makes it tighter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from sae.matching.auction import auction_prices
from sae.matching.candidates import (
    CPU_BLOCK_ROWS,
    Candidates,
    Progress,
    Spare,
    cosine_blocks,
    list_dots,
    report,
    scanned_lists,
    top_candidates,
)
from sae.matching.csr import row_chunks, row_edges

try:
    import lap
except ImportError:  # pragma: no cover - lap is a declared dependency; SciPy is the fallback
    lap = None

# Costs are 2 - cosine so every edge weight is >= 1 (cosines lie in [-1, 1]): no weight is
# ever zero, which sparse graph routines could confuse with a missing edge, and LAPJV is
# given non-negative costs, the case it is written for.
COST_SHIFT = 2.0

# Shortest-path sweeps used to find prices for the gap bound; the bound stays valid when
# the sweeps stop early, only looser.
MAX_PRICE_SWEEPS = 3000
DESCENT_SWEEPS = 20
# A bound this small (float64 rounding of sums of float32 cosines) proves the sparse answer
# is the dense optimum.
PROVEN_GAP = 1e-6
# Rounds of widening the lists that stand in the bound's way, each WIDEN_FACTOR times longer;
# not tried when more than WIDEN_MAX_SHARE of all rows and columns would need it.
WIDEN_ROUNDS = 2
WIDEN_FACTOR = 4
WIDEN_MAX_SHARE = 0.5
# Edges relaxed at a time when pricing the residual graph (bounds its temporary arrays).
PRICE_CHUNK = 1 << 20


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
    phase_seconds: dict[str, float] = field(default_factory=dict)


def assign_exact(
    a: torch.Tensor,
    b: torch.Tensor,
    block_rows: int | None = None,
    progress: Progress | None = None,
    stage: str = "cosines",
) -> Assignment:
    """Optimal assignment of every row of `a` (p <= q rows) from the dense cosine matrix
    (computed where `a` lies, CPU_BLOCK_ROWS rows at a time unless `block_rows` is given)."""
    started = time.perf_counter()
    p, q = a.shape[0], b.shape[0]
    cost = np.empty((p, q), dtype=np.float64)
    for start, block in cosine_blocks(a, b, block_rows or CPU_BLOCK_ROWS):
        rows = cost[start : start + block.shape[0]]
        rows[:] = block.numpy()
        np.subtract(COST_SHIFT, rows, out=rows)
        report(progress, f"{stage} cosines", start + block.shape[0], p)
    cosines_done = time.perf_counter()
    report(progress, f"{stage} solve", 0, 1)
    if p == q and lap is not None:
        partner = np.asarray(lap.lapjv(cost, extend_cost=False, return_cost=False)[0], np.int64)
        solver = "exact-lap"
    else:
        rows_idx, cols_idx = linear_sum_assignment(cost)
        partner = np.empty(p, dtype=np.int64)
        partner[rows_idx] = cols_idx
        solver = "exact-scipy"
    cosine = COST_SHIFT - cost[np.arange(p), partner]
    report(progress, f"{stage} solve", 1, 1)
    finished = time.perf_counter()
    return Assignment(
        partner=partner,
        cosine=cosine,
        objective=float(cosine.sum()),
        solver=solver,
        seconds=finished - started,
        gap_bound=0.0,
        phase_seconds={"cosines": cosines_done - started, "solve": finished - cosines_done},
    )


@dataclass
class Edges:
    """Candidate edges (row, col) with their float32 cosines, in any order."""

    rows: np.ndarray
    cols: np.ndarray
    cosine: np.ndarray

    @staticmethod
    def none() -> Edges:
        return Edges(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0))

    def plus(self, other: Edges) -> Edges:
        return Edges(
            np.concatenate([self.rows, other.rows]),
            np.concatenate([self.cols, other.cols]),
            np.concatenate([self.cosine, other.cosine]),
        )


@dataclass
class CandidateGraph:
    """Deduplicated candidate edges (row, col, cosine), sorted by row then column; `indptr`
    is where each row's edges start, as in a CSR matrix."""

    rows: np.ndarray
    cols: np.ndarray
    cosine: np.ndarray
    shape: tuple[int, int]

    @staticmethod
    def of(edges: Edges, shape: tuple[int, int]) -> CandidateGraph:
        """The graph of `edges`; where an edge comes more than once, its first copy counts."""
        keys = torch.from_numpy(edges.rows.astype(np.int64) * shape[1] + edges.cols)
        # A stable sort keeps copies of an edge in input order (torch's: several times
        # numpy's speed on millions of keys).
        ordered, order = torch.sort(keys, stable=True)
        new = torch.cat([torch.ones(1, dtype=torch.bool), ordered[1:] != ordered[:-1]])
        first = order[new].numpy()
        return CandidateGraph(edges.rows[first], edges.cols[first], edges.cosine[first], shape)

    @property
    def indptr(self) -> np.ndarray:
        return np.searchsorted(self.rows, np.arange(self.shape[0] + 1))

    @property
    def keys(self) -> np.ndarray:
        """Each edge as one number, row * q + col: ascending, as the edges are sorted."""
        return self.rows.astype(np.int64) * self.shape[1] + self.cols

    def matched_cosine(self, partner: np.ndarray) -> np.ndarray:
        """The cosine of each row's edge to its partner (an edge of the graph), by bisection."""
        p, q = self.shape
        return self.cosine[np.searchsorted(self.keys, np.arange(p, dtype=np.int64) * q + partner)]

    def matrix(self, values: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix((values, self.cols, self.indptr), shape=self.shape)

    def plus(self, edges: Edges) -> CandidateGraph:
        """This graph and `edges`: an edge it holds keeps its value. Only the new edges are
        sorted; they are then merged into place (one pass, no insertions)."""
        keys = self.keys
        added = CandidateGraph.of(edges, self.shape)
        added_keys = added.keys
        place = np.searchsorted(keys, added_keys)
        held = keys[np.minimum(place, keys.shape[0] - 1)] == added_keys
        fresh = np.flatnonzero(~held)
        # A fresh edge lands at its place among the old edges, moved on by the fresh edges
        # before it (both are sorted); the old edges fill the rest, in order.
        landing = place[fresh] + np.arange(fresh.shape[0])
        old = torch.ones(keys.shape[0] + fresh.shape[0], dtype=torch.bool)
        old[torch.from_numpy(landing)] = False
        # Places by index: torch copies to them several times as fast as NumPy's masks.
        places = (torch.nonzero(old).flatten(), torch.from_numpy(landing))

        def merged(mine: np.ndarray, theirs: np.ndarray) -> np.ndarray:
            held = torch.from_numpy(mine)
            out = torch.empty(old.shape[0], dtype=held.dtype)
            out.index_copy_(0, places[0], held)
            out.index_copy_(0, places[1], torch.from_numpy(theirs[fresh]))
            return out.numpy()

        return CandidateGraph(
            merged(self.rows, added.rows),
            merged(self.cols, added.cols),
            merged(self.cosine, added.cosine),
            self.shape,
        )


def candidate_graph(a: torch.Tensor, b: torch.Tensor, cand: Candidates) -> CandidateGraph:
    """Union of every row's and column's rescored list, the top-k of the lines redone from
    the scan (elsewhere the top-k lie within the list), and the identity edges (the fallback
    that makes a full matching always exist: row i can always take column i, as p <= q). The
    lists are rescored in float32 already: holding all of them, not only the top-k, costs
    nothing to compute and lowers the cutoffs of the edges left out, so that fewer lines
    are widened later."""
    p, q = a.shape[0], b.shape[0]
    identity = np.arange(p)
    identity_cos = list_dots(a, b, torch.arange(p)[:, None]).double().numpy().ravel()
    redone_rows, redone_cols = (torch.from_numpy(lines) for lines in cand.redone)
    # (line, members, cosines) of each list, rows' lists first, then columns'.
    lists = [
        (torch.arange(p), cand.row_spare.rescored_members, cand.row_spare.rescored),
        (redone_rows, cand.row_cols[redone_rows], cand.row_vals[redone_rows]),
        (torch.arange(q), cand.col_spare.rescored_members, cand.col_spare.rescored),
        (redone_cols, cand.col_rows.T[redone_cols], cand.col_vals.T[redone_cols]),
    ]
    lines = [np.repeat(line.numpy(), members.shape[1]) for line, members, _ in lists]
    members = [members.reshape(-1).numpy() for _, members, _ in lists]
    rows = np.concatenate(lines[:2] + members[2:] + [identity])
    cols = np.concatenate(members[:2] + lines[2:] + [identity])
    cosine = np.concatenate(
        [values.reshape(-1).double().numpy() for _, _, values in lists] + [identity_cos]
    )
    # Every value is the same float32 dot product (`list_dots`), whichever list an edge came
    # from.
    return CandidateGraph.of(Edges(rows, cols, cosine), (p, q))


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


def _residual_prices(
    graph: CandidateGraph,
    partner: np.ndarray,
    progress: Progress | None,
    stage: str,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """Column prices from shortest paths in the residual graph of the optimal sparse matching.

    Bellman-Ford from a source joined to every column at cost 1. In the residual graph a
    matched edge runs column -> row at -cost and every other edge row -> column at +cost, so
    a column has one edge out and the sweeps alternate: the columns improved last pass their
    distance on to their rows, then the rows improved relax their edges, read in place from
    the graph (sorted by row) a bounded number at a time. Only improved nodes are relaxed:
    the sweeps number the depth of the shortest-path tree (hundreds here), and most nodes
    settle long before the last, so each sweep touches a small part of the graph.

    The sweeps end where no edge can lower a distance: then every reduced cost is >= 0 and
    matched edges are tight, so the prices are optimal duals of the sparse problem, whatever
    distances the sweeps started from. From 1 (`start` None) they end at the shortest
    distances. `start`: near-optimal prices to start from instead (an auction's, or an
    earlier optimum's: a smaller graph's, before a widening); the sweeps then end at another
    fixed point near them, as good a proof, settling only what the new edges and the changed
    matching move (131K latents: 0.5-1.3 s instead of 3 s). Square problems only: with more
    columns than rows an unmatched column's price must end at 0, which a start below the
    shortest distances does not promise."""
    p, q = graph.shape
    indptr = graph.indptr
    matched_cost = COST_SHIFT - graph.matched_cosine(partner)
    owner = np.full(q, -1, dtype=np.int64)
    owner[partner] = np.arange(p)
    # Each edge's cost as a step row -> column; a row's matched edge runs the other way only.
    step = COST_SHIFT - graph.cosine
    step[graph.cols == partner[graph.rows]] = np.inf
    row_dist = np.full(p, np.inf)
    # No distance above 1: every column is one step from the source.
    col_dist = np.ones(q) if start is None else np.minimum(1.0 - start, 1.0)
    best = np.full(q, np.inf)
    best_view = torch.from_numpy(best)
    improved = np.arange(q)
    for sweep in range(MAX_PRICE_SWEEPS):
        improved = improved[owner[improved] >= 0]
        rows = owner[improved]
        reach = col_dist[improved] - matched_cost[rows]
        better = reach < row_dist[rows] - 1e-12
        rows = rows[better]
        if rows.size == 0:
            break
        row_dist[rows] = reach[better]
        best.fill(np.inf)
        for piece in row_chunks(indptr, rows, PRICE_CHUNK):
            edges, counts = row_edges(indptr, piece)
            reached = np.repeat(row_dist[piece], counts) + step[edges]
            # Each column's least: torch's scatter is several times numpy's minimum.at.
            best_view.scatter_reduce_(
                0, torch.from_numpy(graph.cols[edges]), torch.from_numpy(reached), "amin"
            )
        improved = np.flatnonzero(best < col_dist - 1e-12)
        if improved.size == 0:
            break
        col_dist[improved] = best[improved]
        if sweep % 16 == 0:
            report(progress, stage, sweep, MAX_PRICE_SWEEPS)
    report(progress, stage, MAX_PRICE_SWEEPS, MAX_PRICE_SWEEPS)
    # Column dual in the min-cost form is dist - 1; the cosine-form price is its negation.
    return 1.0 - col_dist


def price_floor(p: int, q: int) -> float:
    """With more columns than rows a column may stay unmatched, which forces prices >= 0."""
    return 0.0 if q > p else -np.inf


def gap_upper_bound(
    graph: CandidateGraph,
    row_cut: np.ndarray,
    col_cut: np.ndarray,
    residual: np.ndarray,
    objective: float,
    progress: Progress | None = None,
    stage: str = "bound",
) -> float:
    """Proven upper bound on (dense optimum - objective) for a sparse solution, whose
    residual-graph prices are `residual`; `row_cut` and `col_cut` bound the cosines of the
    edges of each row and column left out of the graph."""
    p, q = graph.shape
    forward = graph.matrix(graph.cosine)
    backward = forward.T.tocsr()
    floor = price_floor(p, q)

    def row_duals(price: np.ndarray) -> np.ndarray:
        return np.maximum(_sparse_row_max(forward, price), _implicit_max(row_cut, col_cut, price))

    def col_prices(row_dual: np.ndarray) -> np.ndarray:
        best = np.maximum(
            _sparse_row_max(backward, row_dual), _implicit_max(col_cut, row_cut, row_dual)
        )
        return np.maximum(best, floor)

    best_bound = np.inf
    for start, price in enumerate((np.maximum(residual, floor), np.zeros(q))):
        row_dual = row_duals(price)
        for sweep in range(DESCENT_SWEEPS):
            report(progress, stage, start * DESCENT_SWEEPS + sweep, 2 * DESCENT_SWEEPS)
            best_bound = min(best_bound, row_dual.sum() + price.sum())
            if best_bound - objective <= PROVEN_GAP:
                # Proven (the residual prices usually prove it at once): sweeps would only
                # trim float64 rounding.
                break
            price = col_prices(row_dual)
            row_dual = row_duals(price)
        best_bound = min(best_bound, row_dual.sum() + price.sum())
        if best_bound - objective <= PROVEN_GAP:
            break
    report(progress, stage, 2 * DESCENT_SWEEPS, 2 * DESCENT_SWEEPS)
    return max(0.0, float(best_bound) - objective)


def _solve(
    graph: CandidateGraph, duals: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The optimal matching of the graph: each row's partner and cosine.

    `duals` (row duals u, column prices v) make a warm start: the solver is given the reduced
    costs u_i + v_j - C_ij instead. Every row is matched exactly once, so the row duals shift
    every full matching by the same amount; so do the column prices when every column is
    matched too (p = q), and only then are they used. The optimum is the same for any duals;
    near-optimal ones (a smaller graph's optimum, an auction's prices) leave the solver little
    to repair."""
    p, q = graph.shape
    if duals is None:
        cost = COST_SHIFT - graph.cosine
    else:
        row_dual, price = duals
        reduced = row_dual[graph.rows] - graph.cosine
        if p == q:
            reduced += price[graph.cols]
        # Shifted so every cost is at least 1: a zero would read as a missing edge.
        cost = reduced + (1.0 - min(0.0, float(reduced.min())))
    rows_idx, cols_idx = min_weight_full_bipartite_matching(graph.matrix(cost))
    partner = np.empty(p, dtype=np.int64)
    partner[rows_idx] = cols_idx
    return partner, graph.matched_cosine(partner)


def _duals_prove(graph: CandidateGraph, price: np.ndarray, objective: float) -> bool:
    """Whether column prices `price` (feasible: >= the floor) prove a matching of value
    `objective` optimal on `graph`: the dual value sum_i max_j (C_ij - v_j) + sum_j v_j
    over the graph's edges bounds the graph's optimum from above."""
    row_dual = _sparse_row_max(graph.matrix(graph.cosine), price)
    return float(row_dual.sum() + price.sum()) - objective <= PROVEN_GAP


def _suspects(
    graph: CandidateGraph, row_cut: np.ndarray, col_cut: np.ndarray, price: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns where an edge left out of the graph might beat the sparse optimum's
    own duals (its cutoffs allow C_ij > u_i + v_j): the lines whose lists are too short for
    the bound to prove the answer."""
    forward = graph.matrix(graph.cosine)
    row_dual = _sparse_row_max(forward, price)
    rows = np.flatnonzero(_implicit_max(row_cut, col_cut, price) > row_dual + PROVEN_GAP)
    cols = np.flatnonzero(_implicit_max(col_cut, row_cut, row_dual) > price + PROVEN_GAP)
    return rows, cols


def _widen(
    a: torch.Tensor,
    b: torch.Tensor,
    lines: np.ndarray,
    size: int,
    spare: Spare,
    block_rows: int | None,
    dtype: torch.dtype | None,
) -> tuple[Edges, np.ndarray]:
    """About the `size` best partners in `b` of the given rows of `a` (by scanned value), as
    edges (row of `a`, partner in `b`), and each line's new cutoff. The scan's spare lists
    serve when they are long enough; longer lists need a new scan of those rows."""
    index = torch.from_numpy(lines)
    if size <= spare.members.shape[1]:
        cols, cut = spare.members[index], spare.cutoff[lines]
        # The first entries were rescored with the line's top k: only the rest are new.
        known = spare.rescored.shape[1]
        values = torch.empty(cols.shape)
        values[:, :known] = spare.rescored[index]
        fresh = cols[:, known:]
        # A shorter list ends in -1s: row 0 stands in for them, and they are dropped.
        values[:, known:] = list_dots(a[index], b, fresh.clamp(min=0))
    else:
        cols, values, cut = scanned_lists(a[index], b, size, block_rows, dtype=dtype, err=spare.err)
    listed = (cols >= 0).reshape(-1).numpy()
    edges = Edges(
        np.repeat(lines, cols.shape[1])[listed],
        cols.reshape(-1).numpy()[listed],
        values.reshape(-1).double().numpy()[listed],
    )
    return edges, cut


def assign_sparse(
    a: torch.Tensor,
    b: torch.Tensor,
    k: int = 32,
    block_rows: int | None = None,
    progress: Progress | None = None,
    stage: str = "sparse",
    dtype: torch.dtype | None = None,
    widen_rounds: int | None = None,
) -> Assignment:
    """Optimal assignment within a candidate graph, with a bound on the gap to the dense
    optimum. The graph starts as every row's and column's rescored list (its top-k and more,
    `candidate_graph`); where the bound cannot prove the answer, the lists of the rows and
    columns in the way are made WIDEN_FACTOR times longer and the graph solved again, up to
    `widen_rounds` (WIDEN_ROUNDS) times.
    `dtype` is the candidate scan's (`sae.matching.candidates`); the graph is the same for
    any."""
    if widen_rounds is None:
        widen_rounds = WIDEN_ROUNDS
    started = time.perf_counter()
    p, q = a.shape[0], b.shape[0]
    cand = top_candidates(
        a, b, k, block_rows, progress, f"{stage} candidates", dtype=dtype, spare=WIDEN_FACTOR * k
    )
    row_cut, col_cut = cand.row_cutoff(q), cand.col_cutoff(p)
    graph = candidate_graph(a, b, cand)
    searched_at = time.perf_counter()
    size = k
    price: np.ndarray | None = None
    # The last optimum's residual prices, and its duals (the auction's before the first):
    # a square graph's residual prices start from the last duals' prices.
    residual: np.ndarray | None = None
    duals: tuple[np.ndarray, np.ndarray] | None = None
    objective = -np.inf
    for round_ in range(widen_rounds + 1):
        report(progress, f"{stage} solve", round_, widen_rounds + 1)
        # A widened graph is solved again only when its new edges break the last optimum's
        # duals; where they do not, that matching is still optimal on the larger graph.
        if price is None or not _duals_prove(graph, price, objective):
            if duals is None and p == q:
                start = auction_prices(graph.indptr, graph.cols, graph.cosine, q).price
                duals = (_sparse_row_max(graph.matrix(graph.cosine), start), start)
            partner, cosine = _solve(graph, duals)
            objective = float(cosine.sum())
            warm = duals[1] if duals is not None and p == q else None
            residual = _residual_prices(graph, partner, progress, f"{stage} prices", warm)
            price = np.maximum(residual, price_floor(p, q))
            duals = (_sparse_row_max(graph.matrix(graph.cosine), price), price)
        rows, cols = _suspects(graph, row_cut, col_cut, price)
        if round_ == widen_rounds or rows.size + cols.size == 0:
            break
        if rows.size + cols.size > WIDEN_MAX_SHARE * (p + q):
            break
        size *= WIDEN_FACTOR
        # Every cutoff a line has had stays valid for the edges still left out: keep the least.
        added = Edges.none()
        if rows.size:
            edges, cut = _widen(a, b, rows, size, cand.row_spare, block_rows, dtype)
            row_cut[rows] = np.minimum(row_cut[rows], cut)
            added = added.plus(edges)
        if cols.size:
            edges, cut = _widen(b, a, cols, size, cand.col_spare, block_rows, dtype)
            col_cut[cols] = np.minimum(col_cut[cols], cut)
            added = added.plus(Edges(edges.cols, edges.rows, edges.cosine))
        graph = graph.plus(added)
    report(progress, f"{stage} solve", widen_rounds + 1, widen_rounds + 1)
    solved = time.perf_counter()
    assert residual is not None  # the first round always solves
    gap_bound = gap_upper_bound(
        graph, row_cut, col_cut, residual, objective, progress, f"{stage} bound"
    )
    finished = time.perf_counter()
    return Assignment(
        partner=partner,
        cosine=cosine,
        objective=objective,
        solver="sparse",
        seconds=finished - started,
        gap_bound=gap_bound,
        candidate_edges=int(graph.rows.shape[0]),
        phase_seconds={
            "candidates": searched_at - started,
            "solve": solved - searched_at,
            "bound": finished - solved,
        },
    )
