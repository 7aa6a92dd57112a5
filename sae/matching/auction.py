"""Column prices for a warm start of the sparse solver, from an auction (Bertsekas, 1988).

Every unassigned row bids at once (the Jacobi form, one vectorised step per round) for the
column that gives it the most cosine net of price, raising that price by the margin over its
second-best column plus `epsilon`; each column goes to its highest bidder, whose predecessor
becomes unassigned. When every row holds a column, the prices are within `epsilon` per row of
optimal duals. They are only a start: the solver then works on reduced costs, whose optimum is
the same for any prices, so stopping early (the work budget) costs time, never the answer.

The budget counts a round's fixed cost too: late in an auction a few rows often outbid each
other one small raise at a time (a price war over contested columns), and such rounds look at
few edges each but cost a vectorised step apiece; counted by edges alone, a 131,072-latent
graph of 16 candidates a line ran 4.8 million of them (380 s, where the solver needs seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sae.matching.csr import row_edges

EPSILON = 1e-3
# The auction stops once its rounds have cost this many times a look at each of the graph's
# edges, plus MIN_ROUNDS rounds (a small graph's auction is cheap in any case). Its last rows
# are the dearest: on planted 32,768- and 131,072-latent graphs a budget of 5 left 4 and 8 rows
# unassigned, and auction plus solve took 0.25 and 7.1 s, against 1.05 and 10.9 s with 50
# (every row assigned) and 0.34 and 11.1 s with 2.
WORK_BUDGET = 5
MIN_ROUNDS = 1000
# A row with a single edge bids as if its second-best column were worth this much less (the
# cosine range), which keeps every bid finite.
LONE_MARGIN = 2.0
# A round costs at least as much as looking at this many edges (numpy's per-call overhead of
# its dozen vectorised steps, ~50 us, against ~12 ns an edge).
ROUND_COST = 4096


@dataclass
class Auction:
    """The auction's column prices, its rounds, and the rows left without a column when
    the work budget ran out (0 when it finished)."""

    price: np.ndarray
    rounds: int
    unassigned: int


def auction_prices(
    indptr: np.ndarray, cols: np.ndarray, cosine: np.ndarray, n_cols: int, epsilon: float = EPSILON
) -> Auction:
    """Column prices from an auction on a graph in CSR form (row i's edges are
    indptr[i]:indptr[i+1]) where every row can be given a column of its own."""
    n_rows = indptr.shape[0] - 1
    price = np.zeros(n_cols)
    owner = np.full(n_cols, -1, dtype=np.int64)
    holding = np.full(n_rows, -1, dtype=np.int64)
    bidders = np.arange(n_rows)
    work, budget, rounds = 0, WORK_BUDGET * cols.shape[0] + MIN_ROUNDS * ROUND_COST, 0
    while bidders.size and work < budget:
        edges, counts = row_edges(indptr, bidders)
        offsets = np.cumsum(counts) - counts
        work += max(edges.shape[0], ROUND_COST)
        rounds += 1
        net = cosine[edges] - price[cols[edges]]
        best = np.maximum.reduceat(net, offsets)
        # Each bidder's first edge at its best value, then the best of the others.
        segment = np.repeat(np.arange(bidders.shape[0]), counts)
        at_best = np.flatnonzero(net >= best[segment])
        first = at_best[np.r_[True, segment[at_best[1:]] != segment[at_best[:-1]]]]
        net[first] = -np.inf
        second = np.maximum(np.maximum.reduceat(net, offsets), best - LONE_MARGIN)
        wanted = cols[edges[first]]
        bid = price[wanted] + (best - second) + epsilon
        # Highest bid per column wins (ties: the lower row).
        order = np.lexsort((-bid, wanted))
        won = order[np.r_[True, wanted[order[1:]] != wanted[order[:-1]]]]
        taken = wanted[won]
        outbid = owner[taken]
        holding[outbid[outbid >= 0]] = -1
        owner[taken] = bidders[won]
        holding[bidders[won]] = taken
        price[taken] = bid[won]
        bidders = np.flatnonzero(holding < 0)
    return Auction(price, rounds, int(bidders.size))
