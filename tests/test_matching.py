"""Matching solvers against brute force and SciPy, and the shared-latent definitions."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from sae.checkpoint import SaeWeights, save_saelens, save_sparsify
from sae.errors import UserError
from sae.matching.candidates import list_dots
from sae.matching.pair import (
    MatchConfig,
    match_checkpoints,
    match_directions,
    match_saes,
    shared_mask,
    unit_rows,
    write_assignment,
)
from sae.matching.solvers import assign_exact, assign_sparse


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def random_unit(n: int, d: int, seed: int) -> torch.Tensor:
    return unit(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))


def brute_force_best(cos: np.ndarray) -> float:
    p, q = cos.shape
    return max(
        sum(cos[i, cols[i]] for i in range(p)) for cols in itertools.permutations(range(q), p)
    )


@pytest.mark.parametrize(("p", "q"), [(1, 1), (3, 3), (5, 5), (6, 6), (2, 5), (4, 7)])
def test_solvers_against_brute_force(p: int, q: int) -> None:
    for seed in range(5):
        a, b = random_unit(p, 3, seed), random_unit(q, 3, 100 + seed)
        cos = (a @ b.T).double().numpy()
        best = brute_force_best(cos)
        exact = assign_exact(a, b)
        assert exact.objective == pytest.approx(best, abs=1e-6)
        assert len(set(exact.partner.tolist())) == p
        # A graph of only 1 candidate per row and column may miss the optimum; the bound
        # must still cover the gap, and with every edge present it must find the optimum.
        narrow = assign_sparse(a, b, k=1)
        assert len(set(narrow.partner.tolist())) == p
        assert narrow.objective <= best + 1e-6
        assert best - narrow.objective <= narrow.gap_bound + 1e-6
        full = assign_sparse(a, b, k=q)
        assert full.objective == pytest.approx(best, abs=1e-6)
        assert full.gap_bound == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("p", "q"), [(300, 300), (120, 250)])
def test_exact_against_scipy(p: int, q: int) -> None:
    a, b = random_unit(p, 16, 1), random_unit(q, 16, 2)
    cos = (a @ b.T).double().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    exact = assign_exact(a, b)
    assert exact.solver == ("exact-lap" if p == q else "exact-scipy")
    assert exact.objective == pytest.approx(cos[rows, cols].sum(), abs=1e-6)
    np.testing.assert_allclose(exact.cosine, cos[np.arange(p), exact.partner], atol=1e-12)


def test_sparse_gap_bound_holds_on_random_directions() -> None:
    # Unstructured directions are the hard case for a sparse graph: a real gap exists.
    a, b = random_unit(400, 8, 3), random_unit(400, 8, 4)
    exact, sparse = assign_exact(a, b), assign_sparse(a, b, k=3)
    gap = exact.objective - sparse.objective
    assert -1e-6 <= gap <= sparse.gap_bound + 1e-6
    assert sparse.candidate_edges < 400 * 400


def planted(n: int, d: int, shared: int, noise: float, seed: int):
    """B holds A's first `shared` directions, permuted and perturbed; the rest are fresh."""
    gen = torch.Generator().manual_seed(seed)
    a = unit(torch.randn(n, d, generator=gen))
    b = unit(torch.randn(n, d, generator=gen))
    perm = torch.randperm(n, generator=gen)
    scale = noise * torch.rand(shared, 1, generator=gen)
    b[perm[:shared]] = unit(a[:shared] + scale * torch.randn(shared, d, generator=gen) / d**0.5)
    return a, b, perm


def test_planted_permutation_recovered_by_both_solvers() -> None:
    a, b, perm = planted(500, 32, 500, 0.3, seed=5)
    for result in (assign_exact(a, b), assign_sparse(a, b, k=4)):
        np.testing.assert_array_equal(result.partner, perm.numpy())
    assert assign_sparse(a, b, k=4).gap_bound == pytest.approx(0.0, abs=1e-6)


def test_sparse_equals_exact_on_structured_case() -> None:
    a, b, _ = planted(2000, 64, 1000, 2.0, seed=6)
    exact, sparse = assign_exact(a, b), assign_sparse(a, b, k=16, block_rows=300)
    assert sparse.objective == pytest.approx(exact.objective, rel=1e-3)
    # Each solver rounds a float32 cosine in its own order (a matrix product's, one dot
    # product a pair's: up to d * 2^-24 each from the true sum). Scored the sparse solver's
    # way, the dense optimum is within its bound.
    scored = list_dots(a, b, torch.from_numpy(exact.partner)[:, None]).double().sum()
    assert float(scored) - sparse.objective <= sparse.gap_bound + 1e-9
    assert abs(exact.objective - sparse.objective) <= 2000 * 2 * 64 * 2**-24
    np.testing.assert_array_equal(sparse.cosine > 0.7, exact.cosine > 0.7)


def test_column_candidates_match_a_dense_top_k() -> None:
    from sae.matching.solvers import top_candidates

    a, b = random_unit(700, 8, 7), random_unit(500, 8, 8)
    cand = top_candidates(a, b, k=5, block_rows=64)
    dense = a @ b.T
    torch.testing.assert_close(cand.row_vals, dense.topk(5, dim=1).values)
    col_best = dense.topk(5, dim=0).values
    torch.testing.assert_close(cand.col_vals.sort(dim=0, descending=True).values, col_best)
    got = dense.gather(0, cand.col_rows)
    torch.testing.assert_close(got, cand.col_vals)


def sae_from(decoder: torch.Tensor, encoder: torch.Tensor) -> SaeWeights:
    n, d = decoder.shape
    return SaeWeights(encoder, torch.zeros(n), decoder, torch.zeros(d), {"k": 4})


def test_threshold_is_strict() -> None:
    # a = (1, 0) against b = (3, 4) / 5 has cosine float32(0.6) exactly, through the whole
    # path (float64 norms, float32 product); equal to the threshold is not shared.
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[3.0, 4.0]])
    cosine = float(np.float32(0.6))
    first, second = sae_from(a, a), sae_from(b, b)
    result = match_saes(first, second, MatchConfig(threshold=cosine))
    assert result.decoder.cosine[0] == cosine
    assert result.summary.shared_fraction == 0.0
    assert result.summary.shared_fraction_decoder_only == 0.0
    below = match_saes(first, second, MatchConfig(threshold=float(np.nextafter(cosine, 0))))
    assert below.summary.shared_fraction == 1.0
    assert not shared_mask(np.array([0.7]), np.array([0.9]), 0.7)[0]
    assert shared_mask(np.array([np.nextafter(0.7, 1)]), np.array([0.9]), 0.7)[0]


def test_shared_needs_both_decoder_and_encoder() -> None:
    a, b, perm = planted(300, 32, 300, 0.1, seed=9)
    encoder_b = b.clone()
    encoder_b[perm[:100]] = random_unit(100, 32, 10)  # 100 latents lose their encoder match
    result = match_saes(sae_from(a, a), sae_from(b, encoder_b))
    assert result.summary.shared_fraction_decoder_only == 1.0
    assert result.summary.shared_fraction == pytest.approx(200 / 300)
    # The 100 re-drawn encoder rows pair up among themselves; a few may land on the decoder's
    # partner by chance.
    assert 200 / 300 <= result.summary.encoder_decoder_agreement <= 210 / 300
    assert result.summary.agreement_among_shared == 1.0
    assert result.summary.mean_cos_decoder > result.summary.mean_cos_encoder


def test_reversed_pair_matches_direct_matching() -> None:
    a, b, _ = planted(200, 16, 120, 1.5, seed=11)
    forward = match_saes(sae_from(a, b), sae_from(b, a))
    backward = match_saes(sae_from(b, a), sae_from(a, b))
    reversed_ = forward.reversed()
    np.testing.assert_array_equal(reversed_.decoder.partner, backward.decoder.partner)
    assert reversed_.summary.shared_fraction == backward.summary.shared_fraction


def test_zero_and_nan_rows_are_unmatched_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    import sae.matching.pair

    monkeypatch.setattr(sae.matching.pair, "UNIT_CHUNK", 16)  # rows normalised 16 at a time
    a, b, _ = planted(50, 8, 50, 0.1, seed=12)
    a[3] = 0.0
    b[7] = float("nan")
    unit_a, valid = unit_rows(a)
    assert not valid[3] and valid.sum() == 49
    norms = torch.linalg.vector_norm(unit_a, dim=1)
    torch.testing.assert_close(norms[torch.from_numpy(valid)], torch.ones(49))
    assert norms[3] == 0.0
    torch.testing.assert_close(unit_a[40], a[40] / a[40].norm())
    # float64 weights are normalised in a copy: the caller's tensor is left as it was.
    weights = a.double()
    unit_64, _ = unit_rows(weights)
    assert torch.equal(weights, a.double()) and torch.equal(unit_64, unit_a)
    result = match_saes(sae_from(a, a), sae_from(b, b))
    assert result.decoder.partner[3] == -1 and math.isnan(result.decoder.cosine[3])
    assert result.summary.invalid_rows == {
        "decoder_a": 1,
        "decoder_b": 1,
        "encoder_a": 1,
        "encoder_b": 1,
    }
    assert result.summary.unmatched_decoder == 1
    assert 7 not in result.decoder.partner.tolist()
    assert not result.shared[3]


def test_rectangular_needs_opt_in_and_matches_smaller_into_larger() -> None:
    small, large = random_unit(30, 8, 13), random_unit(50, 8, 14)
    with pytest.raises(UserError, match="--into-larger") as info:
        match_saes(sae_from(small, small), sae_from(large, large))
    assert "\n" not in str(info.value)
    config = MatchConfig(into_larger=True)
    into = match_saes(sae_from(small, small), sae_from(large, large), config)
    assert (into.decoder.partner >= 0).all() and len(set(into.decoder.partner.tolist())) == 30
    cos = (small @ large.T).double().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    assert into.decoder.objective == pytest.approx(cos[rows, cols].sum(), abs=1e-6)
    # The larger into the smaller: 20 latents of the base stay unmatched.
    out = match_saes(sae_from(large, large), sae_from(small, small), config)
    assert out.summary.unmatched_decoder == 20
    assert out.decoder.objective == pytest.approx(into.decoder.objective, abs=1e-6)
    sparse = match_directions(large, small, config.model_copy(update={"solver": "sparse"}))
    assert sparse.objective == pytest.approx(into.decoder.objective, abs=1e-3)


def test_different_d_in_is_an_error() -> None:
    with pytest.raises(UserError, match="d_in 8 but B has d_in 9"):
        match_saes(sae_from(*[random_unit(5, 8, 0)] * 2), sae_from(*[random_unit(5, 9, 0)] * 2))


def test_layouts_give_the_same_answer(tmp_path: Path) -> None:
    a, b, _ = planted(200, 16, 150, 1.0, seed=15)
    enc_a, enc_b, _ = planted(200, 16, 150, 1.5, seed=16)
    first, second = sae_from(a, enc_a), sae_from(b, enc_b)
    save_sparsify(tmp_path / "sparsify_a", first)
    save_saelens(tmp_path / "saelens_a", first)
    save_sparsify(tmp_path / "sparsify_b", second)
    save_saelens(tmp_path / "saelens_b", second)
    direct = match_saes(first, second)
    for name_a, name_b in [("sparsify_a", "saelens_b"), ("saelens_a", "saelens_b")]:
        loaded = match_checkpoints(tmp_path / name_a, tmp_path / name_b)
        np.testing.assert_array_equal(loaded.decoder.partner, direct.decoder.partner)
        np.testing.assert_array_equal(loaded.encoder.partner, direct.encoder.partner)
        assert loaded.summary.shared_fraction == direct.summary.shared_fraction


@pytest.mark.parametrize("solver", ["exact", "sparse"])
def test_config_picks_solver(solver: str) -> None:
    a, b, _ = planted(100, 8, 100, 0.2, seed=17)
    result = match_saes(sae_from(a, a), sae_from(b, b), MatchConfig(solver=solver))
    assert result.summary.solver.startswith(solver)
    auto = match_saes(sae_from(a, a), sae_from(b, b), MatchConfig(exact_max_latents=50))
    assert auto.summary.solver == "sparse"


def test_assignment_files(tmp_path: Path) -> None:
    a, b, _ = planted(40, 8, 20, 0.2, seed=18)
    a[0] = 0.0
    result = match_saes(sae_from(a, a), sae_from(b, b))
    write_assignment(tmp_path / "m.csv", result)
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0] == "latent,decoder_partner,decoder_cosine,encoder_partner,encoder_cosine,shared"
    assert lines[1] == "0,-1,,-1,,0" and len(lines) == 41
    write_assignment(tmp_path / "m.npz", result)
    arrays = np.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(arrays["decoder_partner"], result.decoder.partner)
    np.testing.assert_array_equal(arrays["shared"], result.shared)
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["config"]["threshold"] == 0.7
    assert record["summary"]["n_latents"] == 40
    with pytest.raises(UserError, match=r"\.csv or \.npz"):
        write_assignment(tmp_path / "m.txt", result)


def test_exact_too_large_for_memory_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sae.matching.pair

    monkeypatch.setattr(sae.matching.pair, "available_memory", lambda: 1000)
    a = random_unit(20, 4, 19)
    with pytest.raises(UserError, match="use --solver sparse"):
        match_saes(sae_from(a, a), sae_from(a, a), MatchConfig(solver="exact"))
    sparse = match_saes(sae_from(a, a), sae_from(a, a), MatchConfig(solver="sparse"))
    assert sparse.summary.shared_fraction == 1.0


def test_widening_from_a_shorter_spare_list_adds_only_its_entries() -> None:
    from sae.matching import solvers
    from sae.matching.candidates import ScanError, Spare

    # Line 1's spare list holds 3 of 5 places (-1 past its end, as a column's list where
    # fewer entries beat its threshold): its edges are those 3, with their float32 cosines.
    a, b = random_unit(2, 16, 21), random_unit(9, 16, 22)
    members = torch.tensor([[4, 0, 7, 2, 8], [5, 1, 3, -1, -1]])
    rescored = (b[members[:, :2]] @ a[:, :, None])[:, :, 0]
    spare = Spare(
        members,
        rescored,
        rescored_cutoff=np.array([0.3, 0.4]),
        cutoff=np.array([0.1, 0.2]),
        err=ScanError(base=0.0, unit=0.0),
    )
    edges, cut = solvers._widen(a, b, np.array([0, 1]), 5, spare, 64, None)
    assert edges.rows.tolist() == [0] * 5 + [1] * 3
    assert edges.cols.tolist() == [4, 0, 7, 2, 8, 5, 1, 3]
    np.testing.assert_allclose(edges.cosine, (a[edges.rows] * b[edges.cols]).sum(1), atol=1e-6)
    np.testing.assert_array_equal(cut, [0.1, 0.2])


def test_a_graph_plus_edges_is_the_graph_of_both_its_edges_first() -> None:
    from sae.matching.solvers import CandidateGraph, Edges

    gen = np.random.default_rng(3)

    def edges(n: int) -> Edges:
        return Edges(gen.integers(0, 40, n), gen.integers(0, 50, n), gen.random(n))

    old, new = edges(600), edges(900)  # many of new's edges are old's, with other values
    graph = CandidateGraph.of(old, (40, 50)).plus(new)
    both = CandidateGraph.of(old.plus(new), (40, 50))
    for name in ("rows", "cols", "cosine"):
        np.testing.assert_array_equal(getattr(graph, name), getattr(both, name))
    assert np.all(np.diff(graph.keys) > 0)


def test_widened_graph_is_solved_again_only_when_its_edges_break_the_duals() -> None:
    from sae.matching import solvers

    a, b = random_unit(300, 16, 11), random_unit(300, 16, 12)
    cand = solvers.top_candidates(a, b, k=4, block_rows=64, spare=16)
    graph = solvers.candidate_graph(a, b, cand)
    partner, cosine = solvers._solve(graph)
    price = np.maximum(solvers._residual_prices(graph, partner, None, "prices"), 0.0)
    objective = float(cosine.sum())
    assert solvers._duals_prove(graph, price, objective)
    # Row 0's spare list, with its true cosines: the duals hold unless an edge beats them.
    members = cand.row_spare.members[0]
    values = (a[0] @ b[members].T).double().numpy()
    extra = solvers.Edges(np.zeros(members.shape[0], np.int64), members.numpy(), values)
    wider = graph.plus(extra)
    # Row 0's dual is its matched edge's reduced value (complementary slackness).
    holds = (values - price[members.numpy()]).max() <= cosine[0] - price[partner[0]] + 1e-6
    assert solvers._duals_prove(wider, price, objective) == holds
    # An edge far above every dual, outside the graph, breaks them.
    outside = np.setdiff1d(np.arange(300), graph.cols[graph.rows == 0])[0]
    better = solvers.Edges(np.array([0]), np.array([outside]), np.array([5.0]))
    assert not solvers._duals_prove(graph.plus(better), price, objective)


@pytest.mark.parametrize("q", [300, 340])
def test_a_warm_start_from_a_smaller_graphs_optimum_solves_and_prices_the_new_one(q: int) -> None:
    from sae.matching import solvers

    # Square (row and column duals) and rectangular (row duals only) problems.
    a, b = random_unit(300, 16, 13), random_unit(q, 16, 14)
    cand = solvers.top_candidates(a, b, k=3, block_rows=64, spare=24)
    graph = solvers.candidate_graph(a, b, cand)
    partner, old = solvers._solve(graph)
    floor = solvers.price_floor(300, q)
    before = solvers._residual_prices(graph, partner, None, "prices")
    price = np.maximum(before, floor)
    duals = (solvers._sparse_row_max(graph.matrix(graph.cosine), price), price)
    # Every row's spare list: many new edges, some breaking the old duals.
    members = cand.row_spare.members
    values = torch.bmm(b[members], a[:, :, None])[:, :, 0].double().numpy()
    rows = np.repeat(np.arange(300), members.shape[1])
    wider = graph.plus(solvers.Edges(rows, members.reshape(-1).numpy(), values.reshape(-1)))
    reduced = duals[0][wider.rows] + np.where(q == 300, price[wider.cols], 0.0) - wider.cosine
    assert (reduced < -1e-9).any(), "no new edge breaks the duals: nothing to repair"
    cold_partner, cold = solvers._solve(wider)
    warm_partner, warm = solvers._solve(wider, duals)
    assert warm.sum() == pytest.approx(cold.sum(), abs=1e-9)
    assert warm.sum() > old.sum() + 1e-6
    np.testing.assert_array_equal(warm_partner, cold_partner)
    assert (cold_partner != partner).any()
    if q != 300:
        return
    # (Square only) Prices started from the old optimum's, or from an auction's on the new
    # graph, end at other fixed points, optimal duals all the same: every reduced cost >= 0
    # and matched edges tight.
    from_scratch = solvers._residual_prices(wider, cold_partner, None, "prices")
    started = solvers._residual_prices(wider, cold_partner, None, "prices", start=before)
    auction = solvers.auction_prices(wider.indptr, wider.cols, wider.cosine, q).price
    bid = solvers._residual_prices(wider, cold_partner, None, "prices", start=auction)
    for other in (started, bid):
        assert np.abs(other - from_scratch).max() > 1e-9, "the start made no difference"
    for new_price in (from_scratch, started, bid):
        new_price = np.maximum(new_price, floor)
        matched = cold[wider.rows] - new_price[cold_partner[wider.rows]]
        assert (matched - (wider.cosine - new_price[wider.cols])).min() >= -1e-9
        assert solvers._duals_prove(wider, new_price, float(cold.sum()))


def test_auction_prices_are_duals_within_epsilon_per_row() -> None:
    from sae.matching import auction, solvers

    # Two rows that both prefer column 0: row 1 needs it more (0.85 against 0.1 elsewhere).
    indptr, cols = np.array([0, 2, 4]), np.array([0, 1, 0, 1])
    price = auction.auction_prices(indptr, cols, np.array([0.9, 0.8, 0.85, 0.1]), 2).price
    net = np.array([[0.9, 0.8], [0.85, 0.1]]) - price
    # Each row's column of the optimum is within epsilon of its best net value; the other
    # assignment is not.
    slack = net.max(axis=1, keepdims=True) - net
    assert max(slack[0, 1], slack[1, 0]) <= auction.EPSILON + 1e-12
    assert slack[1, 1] > auction.EPSILON

    a, b = random_unit(200, 8, 15), random_unit(200, 8, 16)
    graph = solvers.candidate_graph(a, b, solvers.top_candidates(a, b, k=6, block_rows=64))
    result = auction.auction_prices(graph.indptr, graph.cols, graph.cosine, 200)
    assert result.unassigned == 0
    price = result.price
    row_dual = solvers._sparse_row_max(graph.matrix(graph.cosine), price)
    partner, cosine = solvers._solve(graph)
    # Weak duality bounds the optimum from above; a finished auction is within epsilon a row.
    dual = row_dual.sum() + price.sum()
    assert cosine.sum() - 1e-9 <= dual <= cosine.sum() + 200 * auction.EPSILON
    warm_partner, _ = solvers._solve(graph, (row_dual, price))
    np.testing.assert_array_equal(warm_partner, partner)


def test_auction_price_war_stops_within_its_budget() -> None:
    """Few candidates a line make price wars: rows outbidding each other one at a time for
    thousands of rounds (7,871 here when only edges were counted). Each round's fixed cost
    counts against the budget, and prices from a stopped auction still give the optimum."""
    from sae.matching import auction, solvers

    a, b = random_unit(2000, 32, 1), random_unit(2000, 32, 2)
    graph = solvers.candidate_graph(a, b, solvers.top_candidates(a, b, k=4, block_rows=256))
    edges = graph.cols.shape[0]
    result = auction.auction_prices(graph.indptr, graph.cols, graph.cosine, 2000)
    budget = auction.WORK_BUDGET * edges + auction.MIN_ROUNDS * auction.ROUND_COST
    assert result.rounds <= budget // auction.ROUND_COST + 1
    assert result.unassigned > 0  # stopped by the budget, not finished
    _, cold = solvers._solve(graph)
    row_dual = solvers._sparse_row_max(graph.matrix(graph.cosine), result.price)
    _, warm = solvers._solve(graph, (row_dual, result.price))
    assert warm.sum() == pytest.approx(cold.sum(), abs=1e-9)


def test_rows_edges_are_gathered_and_split_by_edge_count() -> None:
    from sae.matching.csr import row_chunks, row_edges

    indptr = np.array([0, 3, 3, 8, 9, 11])  # rows of 3, 0, 5, 1 and 2 edges
    edges, counts = row_edges(indptr, np.array([4, 0, 2]))
    np.testing.assert_array_equal(edges, [9, 10, 0, 1, 2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(counts, [2, 3, 5])
    pieces = row_chunks(indptr, np.array([0, 1, 2, 3, 4]), limit=4)
    # 3 edges, then row 2's 5 alone (more than the limit), then 1 + 2.
    assert [piece.tolist() for piece in pieces] == [[0, 1], [2], [3, 4]]
    assert row_chunks(indptr, np.array([], dtype=np.int64), limit=4) == []
