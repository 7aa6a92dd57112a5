"""The fast candidate search against a dense float32 top-k, its error bound against the
actual bfloat16 error, and the proven sparse path against the exact solver."""

from pathlib import Path

import numpy as np
import pytest
import torch

import sae.matching.candidates as candidates
import sae.precision as precision
from sae.checkpoint import SaeWeights, save_saelens, save_sparsify
from sae.matching.candidates import list_dots, scan_error, top_candidates
from sae.matching.pair import MatchConfig, match_checkpoints, match_saes
from sae.matching.solvers import DESCENT_SWEEPS, assign_exact, assign_sparse, candidate_graph


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def planted(n: int, d: int, shared: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B holds `shared` of A's directions, permuted, with noise of a random size (matched
    cosines spread across 0.7); the rest of B is fresh random directions."""
    gen = torch.Generator().manual_seed(seed)
    a = unit(torch.randn(n, d, generator=gen))
    b = unit(torch.randn(n, d, generator=gen))
    count = int(shared * n)
    perm = torch.randperm(n, generator=gen)
    sigma = 0.1 + 1.5 * torch.rand(count, 1, generator=gen)
    noise = unit(torch.randn(count, d, generator=gen))
    b[perm[:count]] = unit(a[:count] + sigma * noise)
    return a, b


def assert_dense_top_k(cand: candidates.Candidates, a: torch.Tensor, b: torch.Tensor, k: int):
    dense = a @ b.T
    torch.testing.assert_close(cand.row_vals, dense.topk(k, dim=1).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(dense.gather(1, cand.row_cols), cand.row_vals, atol=1e-5, rtol=0)
    torch.testing.assert_close(cand.col_vals, dense.topk(k, dim=0).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(dense.gather(0, cand.col_rows), cand.col_vals, atol=1e-5, rtol=0)


@pytest.mark.parametrize("list_factor", [1, 2])
@pytest.mark.parametrize(
    ("p", "q", "d", "k"),
    # No grouping (500 columns), one level of groups, three levels (8,192 -> 1,024 -> 128 -> 16).
    [(700, 500, 8, 5), (600, 1024, 96, 16), (200, 8192, 96, 8)],
)
def test_bfloat16_scan_finds_the_float32_top_k(
    monkeypatch: pytest.MonkeyPatch, list_factor: int, p: int, q: int, d: int, k: int
) -> None:
    # With lists of exactly k almost every row and column must be redone from the scan: both
    # the short path and the redo path have to give the float32 answer.
    monkeypatch.setattr(candidates, "LIST_FACTOR", list_factor)
    a, b = planted(max(p, q), d, 0.5, seed=p + d)
    a, b = a[:p], b[:q]
    cand = top_candidates(a, b, k, block_rows=128, dtype=torch.bfloat16)
    if list_factor == 1:
        assert min(lines.size for lines in cand.redone) > 0
    assert_dense_top_k(cand, a, b, k)


@pytest.mark.parametrize(("dense_share", "list_factor"), [(0.0, 2), (1.0, 1)])
def test_columns_from_the_rows_blocks_in_pieces(
    monkeypatch: pytest.MonkeyPatch, dense_share: float, list_factor: int
) -> None:
    # Columns are read from the row pass's blocks 96 at a time (a piece starts inside a
    # block's rows), entries compared one by one (0.0) or through groups' maxima (1.0); the
    # last block's 60 rows do not split into groups. Lists of 12 with room for 6 more fill
    # up again and again over 700 rows. Lists of exactly k send most lines down the redo
    # path, which must leave the spare lists as they were.
    monkeypatch.setattr(candidates, "LIST_FACTOR", list_factor)
    monkeypatch.setattr(candidates, "COLUMN_CHUNK", 96)
    monkeypatch.setattr(candidates, "DENSE_SHARE", dense_share)
    a, b = planted(700, 48, 0.5, seed=7)
    b = b[:500]
    cand = top_candidates(a, b, 6, block_rows=128, spare=12)
    if list_factor == 1:
        assert min(lines.size for lines in cand.redone) > 0
    assert_dense_top_k(cand, a, b, 6)
    dense = (a.bfloat16() @ b.bfloat16().T).float()
    # The spare lists hold each column's best scanned entries, best first: all 12, or as
    # many as beat the column's threshold (then -1s), never fewer than 2k.
    members = cand.col_spare.members
    listed = members >= 0
    length = listed.sum(dim=1)
    assert bool((listed == (torch.arange(12) < length[:, None])).all())
    assert int(length.min()) >= list_factor * 6
    if list_factor == 1:
        assert int(length.min()) < 12 == int(length.max())
    best = dense.topk(12, dim=0).values.T
    spare_values = dense.T.gather(1, members.clamp(min=0))
    # (One bfloat16 rounding step of slack: a block and the whole product may sum apart.)
    torch.testing.assert_close(spare_values[listed], best[listed], atol=2**-8, rtol=0)
    # The cutoff bounds the float32 cosine of every entry left out of a list.
    exact = a @ b.T
    left_out = torch.ones(500, 700, dtype=torch.bool)
    left_out[torch.arange(500)[:, None].expand_as(members)[listed], members[listed]] = False
    cutoff = torch.from_numpy(cand.col_spare.cutoff).float()
    assert bool((exact.T[left_out] <= cutoff[:, None].expand(-1, 700)[left_out]).all())
    # Their first 2k entries carry their float32 cosines, rows' and columns' alike.
    for spare, matrix in ((cand.row_spare, exact), (cand.col_spare, exact.T)):
        listed = spare.members[:, : spare.rescored.shape[1]]
        torch.testing.assert_close(spare.rescored, matrix.gather(1, listed), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rescanned", [False, True])
def test_rows_and_columns_of_negative_cosines(
    monkeypatch: pytest.MonkeyPatch, rescanned: bool
) -> None:
    # The scan reads a block's entries as integer keys, which order as the values only for
    # values >= +0: a block with rows whose every cosine is negative, and a column chunk
    # whose thresholds are, must be read by value, the rest by key, with the same answer.
    # `rescanned`: thresholds so high that every column is scanned again whole.
    monkeypatch.setattr(candidates, "COLUMN_CHUNK", 1024)
    if rescanned:
        monkeypatch.setattr(candidates, "SAMPLE_STEP", 1)
        monkeypatch.setattr(candidates, "THRESHOLD_MARGIN", 0.01)
    seen: list[torch.dtype] = []
    best_members = candidates._best_members

    def spy(values: torch.Tensor, size: int):
        seen.append(values.dtype)
        return best_members(values, size)

    monkeypatch.setattr(candidates, "_best_members", spy)
    gen = torch.Generator().manual_seed(5)
    d, e0, e1 = 96, torch.eye(96)[0], torch.eye(96)[1]

    def around(direction: torch.Tensor, n: int) -> torch.Tensor:
        return unit(direction + 0.1 * torch.randn(n, d, generator=gen))

    # Rows 0-127 (one block) are negative against every column; columns 4,096 on, one chunk
    # at a time, are negative against every row.
    a = torch.cat([around(e1 - e0, 128), around(e1 + e0, 128)])
    b = torch.cat([around(e0, 4096), around(-e1, 4096)])
    assert bool((a[:128] @ b.T < 0).all()) and bool((a @ b[4096:].T < 0).all())
    cand = top_candidates(a, b, 8, block_rows=128, dtype=torch.bfloat16)
    assert seen.count(torch.bfloat16) == 1 and seen.count(torch.int16) == 2
    assert_dense_top_k(cand, a, b, 8)


@pytest.mark.parametrize("list_factor", [1, 2])
def test_the_graph_holds_every_rescored_list_and_its_cutoffs_bound_the_rest(
    monkeypatch: pytest.MonkeyPatch, list_factor: int
) -> None:
    # Lists of 2k (and of k, where most lines are redone): each row's and column's rescored
    # list is in the graph with its float32 cosines, and the cutoffs bound the float32
    # cosine of every edge left out, tighter than the k-th cosine where the list is longer.
    monkeypatch.setattr(candidates, "LIST_FACTOR", list_factor)
    a, b = planted(900, 48, 0.5, seed=11)
    b = b[:700]
    a = a[:600]
    cand = top_candidates(a, b, 6, block_rows=128, dtype=torch.bfloat16, spare=24)
    graph = candidate_graph(a, b, cand)
    exact = a @ b.T
    in_graph = torch.zeros(exact.shape, dtype=torch.bool)
    in_graph[torch.from_numpy(graph.rows), torch.from_numpy(graph.cols)] = True
    torch.testing.assert_close(
        torch.from_numpy(graph.cosine).float(),
        exact[torch.from_numpy(graph.rows), torch.from_numpy(graph.cols)],
        atol=1e-5,
        rtol=0,
    )
    for spare, held in ((cand.row_spare, in_graph), (cand.col_spare, in_graph.T)):
        listed = spare.members[:, : spare.rescored.shape[1]]
        assert bool(held.gather(1, listed).all())
    row_cut = torch.from_numpy(cand.row_cutoff(700)).float()
    col_cut = torch.from_numpy(cand.col_cutoff(600)).float()
    bound = torch.minimum(row_cut[:, None], col_cut[None, :])
    assert bool((exact[~in_graph] <= bound[~in_graph]).all())
    assert bool(in_graph.gather(1, cand.row_cols).all())
    assert bool(in_graph.gather(0, cand.col_rows).all())
    if list_factor == 2:
        assert (row_cut < cand.row_vals[:, -1]).float().mean() > 0.5


def test_float32_scan_gives_the_same_candidates() -> None:
    a, b = planted(900, 32, 0.4, seed=3)
    fast = top_candidates(a, b, 8, block_rows=200)
    plain = top_candidates(a, b, 8, block_rows=200, dtype=torch.float32)
    np.testing.assert_array_equal(fast.row_cols.numpy(), plain.row_cols.numpy())
    np.testing.assert_array_equal(fast.col_rows.numpy(), plain.col_rows.numpy())
    assert_dense_top_k(plain, a, b, 8)


def test_scan_dtype_follows_the_timed_products(monkeypatch: pytest.MonkeyPatch) -> None:
    # bfloat16 only where a timed product is faster by the margin; never on CUDA (no GPU
    # is needed to ask: the choice looks only at the device's type).
    assert candidates.scan_dtype(torch.device("cuda")) == torch.float32
    for gain, expected in ((0.0, torch.bfloat16), (1e9, torch.float32)):
        monkeypatch.setattr(precision, "BFLOAT16_GAIN", gain)
        precision.bfloat16_is_faster.cache_clear()
        assert candidates.scan_dtype(torch.device("cpu")) == expected
    precision.bfloat16_is_faster.cache_clear()


def test_scan_error_bounds_the_actual_error() -> None:
    a, b = planted(2048, 576, 0.5, seed=4)
    scan_a, scan_b = a.bfloat16(), b.bfloat16()
    err = scan_error(a, b, scan_a, scan_b)
    exact = a.double() @ b.double().T
    scanned = (scan_a @ scan_b.T).double()
    # Every entry's scan lies at or above the least value its true cosine allows.
    assert bool((scanned >= err.lower(exact.float()).double()).all())
    actual = (scanned - exact).abs().max().item()
    assert 0 < actual < err.base + err.unit
    # The bound is a margin of about 1% of the cosine range, not a blanket one.
    assert err.base + err.unit < 0.012


def test_an_edge_has_one_rescored_value_whichever_list_finds_it() -> None:
    a, b = planted(300, 576, 0.5, seed=7)
    members = torch.randint(0, 300, (300, 12), generator=torch.Generator().manual_seed(8))
    rows_way = list_dots(a, b, members)
    # The same pairs from the columns' side: b's rows against the a rows that listed them.
    rows = torch.arange(300).repeat_interleave(12)
    order = torch.argsort(members.reshape(-1) * 300 + rows)
    pairs_cols, pairs_rows = members.reshape(-1)[order], rows[order]
    columns_way = torch.empty(300 * 12)
    columns_way[order] = candidates._dots(b, a, pairs_cols, pairs_rows)
    assert torch.equal(rows_way.reshape(-1), columns_way)
    assert torch.equal(rows_way, list_dots(a, b, members))
    # A few rows against the whole table are computed from the table's side: same values.
    assert 20 * candidates.TABLE_SIDE <= 300
    assert torch.equal(list_dots(a[:20], b, members[:20]), rows_way[:20])
    # A float32 dot product of d terms: within d * 2^-24 of the exact cosine.
    exact = (a.double()[:, None, :] * b.double()[members]).sum(dim=2)
    assert (rows_way.double() - exact).abs().max().item() <= 576 * 2.0**-24


def sae_of(decoder: torch.Tensor, encoder: torch.Tensor) -> SaeWeights:
    n, d = decoder.shape
    return SaeWeights(encoder, torch.zeros(n), decoder, torch.zeros(d), {"k": 8})


def test_sparse_path_proves_the_exact_answer_on_planted_pairs(tmp_path: Path) -> None:
    n, d = 4096, 64
    dec_a, dec_b = planted(n, d, 0.45, seed=5)
    enc_a, enc_b = planted(n, d, 0.45, seed=6)
    first, second = sae_of(dec_a, enc_a), sae_of(dec_b, enc_b)
    save_sparsify(tmp_path / "a", first)
    save_saelens(tmp_path / "b", second)
    stages: set[str] = set()
    bound_steps: set[int] = set()

    def progress(stage: str, done: int, total: int) -> None:
        stages.add(stage)
        if stage.endswith("bound"):
            bound_steps.add(done)

    fast = match_checkpoints(tmp_path / "a", tmp_path / "b", MatchConfig(), progress)
    exact = match_saes(first, second, MatchConfig(solver="exact"))
    assert fast.summary.solver == "sparse"
    assert fast.summary.gap_bound_decoder == fast.summary.gap_bound_encoder == 0.0
    np.testing.assert_array_equal(fast.shared, exact.shared)
    np.testing.assert_array_equal(fast.decoder.partner, exact.decoder.partner)
    assert fast.summary.shared_fraction == exact.summary.shared_fraction
    assert 0.1 < fast.summary.shared_fraction < 0.45
    # The residual prices prove the optimum at once: the bound takes no descent sweeps.
    assert bound_steps == {0, 2 * DESCENT_SWEEPS}
    for side in ("decoder", "encoder"):
        assert {f"{side} {phase}" for phase in ("candidates", "solve", "prices", "bound")} <= stages
        assert {f"{side} {phase}" for phase in ("candidates", "solve", "bound")} <= set(
            fast.summary.phase_seconds
        )


def test_gap_bound_holds_where_it_proves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import sae.matching.solvers

    # Unstructured directions and lists of 2 with no widening: a real gap, and a bound above it.
    gen = torch.Generator().manual_seed(7)
    a, b = unit(torch.randn(600, 8, generator=gen)), unit(torch.randn(600, 8, generator=gen))
    exact = assign_exact(a, b)
    narrow = assign_sparse(a, b, k=2, block_rows=128, widen_rounds=0)
    gap = exact.objective - narrow.objective
    assert gap > 1e-3
    assert gap <= narrow.gap_bound + 1e-6
    # Widening every row and column that stands in the way narrows the bound.
    monkeypatch.setattr(sae.matching.solvers, "WIDEN_MAX_SHARE", 1.0)
    widened = assign_sparse(a, b, k=2, block_rows=128)
    assert exact.objective - widened.objective <= widened.gap_bound + 1e-6
    assert widened.gap_bound < narrow.gap_bound


def test_auto_falls_back_to_exact_where_the_bound_proves_nothing() -> None:
    gen = torch.Generator().manual_seed(8)
    a, b = unit(torch.randn(300, 8, generator=gen)), unit(torch.randn(300, 8, generator=gen))
    config = MatchConfig(candidates=2, widen_rounds=0)
    auto = match_saes(sae_of(a, a), sae_of(b, b), config)
    assert auto.summary.solver.startswith("exact")
    assert auto.summary.gap_bound_decoder == 0.0
    assert "decoder sparse bound" in auto.summary.phase_seconds
    exact = match_saes(sae_of(a, a), sae_of(b, b), MatchConfig(solver="exact"))
    assert auto.summary.objective_decoder == pytest.approx(exact.summary.objective_decoder)
    beyond = match_saes(
        sae_of(a, a), sae_of(b, b), config.model_copy(update={"exact_max_latents": 100})
    )
    assert beyond.summary.solver == "sparse" and beyond.summary.gap_bound_decoder > 0
