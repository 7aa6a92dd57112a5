"""Multi-seed statistics, seed-folder discovery and the `autointerp match` command."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sae.checkpoint import SaeWeights, save_saelens, save_sparsify
from sae.errors import UserError
from sae.matching import MatchConfig
from sae.matching.multiseed import (
    analyse_folder,
    analyse_seeds,
    find_seed_checkpoints,
    presence_statistics,
)
from service.cli import app

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_presence_statistics_by_hand() -> None:
    t, f = True, False
    masks = {
        (0, 1): [t, t, f, f],
        (0, 2): [t, f, t, f],
        (1, 0): [t, f, f, t],
        (1, 2): [t, f, f, f],
        (2, 0): [f, f, f, f],
        (2, 1): [t, t, t, t],
    }
    shared = {key: np.array(value) for key, value in masks.items()}
    exactly, only_in_base = presence_statistics(shared, [0, 1, 2])
    # Base 0 has latents in 3, 2, 2, 1 SAEs; base 1 in 3, 1, 1, 2; base 2 in 2, 2, 2, 2.
    np.testing.assert_allclose(exactly, [1.0, 7 / 3, 2 / 3])
    # One other seed: base 0 keeps 1/2 either way, base 1 1/2 or 3/4, base 2 all or none.
    np.testing.assert_allclose(only_in_base, [1.0, (0.5 + 0.625 + 0.5) / 3, (0.25 + 0.5) / 3])


def test_only_in_base_samples_subsets_when_there_are_many() -> None:
    seeds = list(range(10))
    rng = np.random.default_rng(0)
    shared = {(a, b): rng.random(50) < 0.3 for a in seeds for b in seeds if a != b}
    exactly, only_in_base = presence_statistics(shared, seeds)
    assert sum(exactly) == pytest.approx(50)
    assert only_in_base[0] == 1.0
    assert all(x >= y for x, y in zip(only_in_base, only_in_base[1:], strict=False))


def seed_saes(count: int, n: int = 150, d: int = 24, seed: int = 0) -> dict[int, SaeWeights]:
    """SAEs sharing a pool of directions to different degrees, each in its own order."""
    gen = torch.Generator().manual_seed(seed)
    pool = unit(torch.randn(n, d, generator=gen))
    saes = {}
    for s in range(count):
        fresh = torch.rand(n, generator=gen) < 0.2 * (s + 1)
        dec = unit(pool + 0.2 * torch.randn(n, d, generator=gen) / d**0.5)
        dec[fresh] = unit(torch.randn(int(fresh.sum()), d, generator=gen))
        perm = torch.randperm(n, generator=gen)
        dec = dec[perm]
        saes[s] = SaeWeights(dec.clone(), torch.zeros(n), dec, torch.zeros(d), {"k": 4})
    return saes


def test_analyse_seeds_is_consistent_with_pairs() -> None:
    saes = seed_saes(3)
    result = analyse_seeds(saes, MatchConfig())
    assert set(result.pairs) == {"0->1", "0->2", "1->0", "1->2", "2->0", "2->1"}
    for a in range(3):
        assert result.shared_fraction[a][a] == 1.0
        for b in range(3):
            if a != b:
                assert result.shared_fraction[a][b] == result.pairs[f"{a}->{b}"].shared_fraction
    # Equal sizes: the shared pairs are the same seen from either side.
    assert result.shared_fraction[0][1] == result.shared_fraction[1][0]
    assert sum(result.present_in_exactly) == pytest.approx(150)
    assert result.only_in_base_fraction[0] == 1.0
    assert result.only_in_base_fraction[1] >= result.only_in_base_fraction[2]
    # Seed 2 re-drew the most directions, so it shares the least with seed 0.
    assert result.shared_fraction[0][1] > result.shared_fraction[0][2]


def test_multiseed_needs_equal_sizes() -> None:
    saes = seed_saes(2)
    saes[2] = seed_saes(1, n=100)[0]
    with pytest.raises(UserError, match="one size"):
        analyse_seeds(saes, MatchConfig(into_larger=True))


def write_run(root: Path, saes: dict[int, SaeWeights], hookpoint: str = "model.layers.6.mlp"):
    for seed, weights in saes.items():
        save = save_saelens if seed % 2 else save_sparsify
        save(root / hookpoint / f"seed{seed}", weights)


def test_find_seed_checkpoints(tmp_path: Path) -> None:
    write_run(tmp_path, seed_saes(3, n=10))
    write_run(tmp_path, seed_saes(2, n=10), hookpoint="model.layers.3.mlp")
    (tmp_path / "model.layers.6.mlp" / "notes").mkdir()
    found = find_seed_checkpoints(tmp_path)
    assert list(found) == ["model.layers.3.mlp", "model.layers.6.mlp"]
    assert list(found["model.layers.6.mlp"]) == [0, 1, 2]
    one_hookpoint = find_seed_checkpoints(tmp_path / "model.layers.3.mlp")
    assert list(one_hookpoint) == ["model.layers.3.mlp"]
    results = analyse_folder(tmp_path)
    assert results["model.layers.6.mlp"].seeds == [0, 1, 2]


def test_seed_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no seed<N> checkpoint folders"):
        find_seed_checkpoints(tmp_path)
    write_run(tmp_path, {0: seed_saes(1, n=10)[0]})
    with pytest.raises(UserError, match="only seed 0"):
        find_seed_checkpoints(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        find_seed_checkpoints(tmp_path / "missing")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AUTOINTERP, *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment in lines[0]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    write_run(root, seed_saes(3))
    save_sparsify(root / "other" / "wide", seed_saes(1, n=200)[0])
    save_sparsify(root / "other" / "deep", seed_saes(1, d=32)[0])
    return root


def test_cli_match_pair_json_and_assignment(run_folder: Path, tmp_path: Path) -> None:
    hook = run_folder / "model.layers.6.mlp"
    out = tmp_path / "assignment.csv"
    result = run_cli(
        "match", str(hook / "seed0"), str(hook / "seed1"), "--json", "--assignment-out", str(out)
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    for key in (
        "n_latents",
        "shared_fraction",
        "shared_fraction_decoder_only",
        "encoder_decoder_agreement",
        "mean_cos_decoder",
        "mean_cos_encoder",
        "solver",
        "seconds",
        "gap_bound_decoder",
    ):
        assert key in summary
    assert summary["n_latents"] == 150 and 0 < summary["shared_fraction"] < 1
    assert len(out.read_text().splitlines()) == 151
    sparse = CliRunner().invoke(
        app, ["match", str(hook / "seed0"), str(hook / "seed1"), "--json", "--solver", "sparse"]
    )
    assert json.loads(sparse.stdout)["solver"] == "sparse"
    assert json.loads(sparse.stdout)["shared_fraction"] == summary["shared_fraction"]


def test_cli_match_says_when_the_bound_does_not_prove_the_answer(run_folder: Path) -> None:
    hook = run_folder / "model.layers.6.mlp"
    pair = ["match", str(hook / "seed0"), str(hook / "seed1"), "--solver", "sparse"]
    proven = CliRunner().invoke(app, pair)
    assert proven.exit_code == 0, proven.output
    assert "not proven" not in proven.stdout
    narrow = CliRunner().invoke(
        app, [*pair, "--candidates", "1", "--widen-rounds", "0"], terminal_width=200
    )
    assert narrow.exit_code == 0, narrow.output
    assert "not proven" in narrow.stdout and "--candidates" in narrow.stdout


def test_cli_match_all_prints_table(run_folder: Path) -> None:
    result = CliRunner().invoke(app, ["match", "--all", str(run_folder / "model.layers.6.mlp")])
    assert result.exit_code == 0, result.output
    assert "only in base" in result.stdout and "present in exactly" in result.stdout


def test_cli_match_error_exits_2_with_one_line() -> None:
    assert_one_line_error(run_cli("match", "missing-a", "missing-b"), "does not exist")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["{h}/seed0", "{o}/wide"], "--into-larger"),
        (["{h}/seed0", "{o}/deep"], "d_in 24 but"),
        (["{h}/seed0"], "give two checkpoint folders"),
        (["{h}/seed0", "{h}/seed1", "--all", "{h}"], "not both"),
        (["{h}/seed0", "{h}/seed1", "--solver", "fast"], "solver"),
        (["{h}/seed0", "{h}/seed1", "--threshold", "1.5"], "threshold"),
        (["{h}/seed0", "{h}/seed1", "--assignment-out", "x.txt"], ".csv or .npz"),
        (["--all", "{o}"], "no seed<N> checkpoint folders"),
    ],
)
def test_cli_match_errors(run_folder: Path, args: list[str], fragment: str) -> None:
    # In-process: `main` turning a UserError into exit status 2 is checked once above.
    hook, other = run_folder / "model.layers.6.mlp", run_folder / "other"
    filled = [arg.format(h=hook, o=other) for arg in args]
    result = CliRunner().invoke(app, ["match", *filled])
    assert isinstance(result.exception, UserError), result.output
    assert fragment in str(result.exception) and "\n" not in str(result.exception)


def test_cli_match_into_larger(run_folder: Path) -> None:
    hook, other = run_folder / "model.layers.6.mlp", run_folder / "other"
    args = ["match", str(hook / "seed0"), str(other / "wide"), "--into-larger", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_latents"] == 150 and summary["n_latents_b"] == 200
    assert summary["unmatched_decoder"] == 0


def test_analyse_folder_keeps_each_pair_and_resumes(tmp_path: Path) -> None:
    write_run(tmp_path, seed_saes(3))
    first = analyse_folder(tmp_path)["model.layers.6.mlp"]
    finished = tmp_path / "model.layers.6.mlp" / "matches"
    assert sorted(p.name for p in finished.glob("*.npz")) == [
        "seed0-seed1.npz",
        "seed0-seed2.npz",
        "seed1-seed2.npz",
    ]
    # An interrupted run leaves no record for the pair it was solving: that pair is solved
    # again, the others are read back (their recorded solve time is the original one).
    (finished / "seed1-seed2.json").unlink()
    again = analyse_folder(tmp_path)["model.layers.6.mlp"]
    assert again.pairs["0->1"].seconds == first.pairs["0->1"].seconds
    assert again.pairs["1->2"].seconds != first.pairs["1->2"].seconds
    assert again.shared_fraction == first.shared_fraction
    assert again.present_in_exactly == first.present_in_exactly
    # The threshold only decides what counts as shared: saved assignments are re-summarised.
    strict = analyse_folder(tmp_path, MatchConfig(threshold=0.95))["model.layers.6.mlp"]
    assert strict.pairs["0->1"].seconds == first.pairs["0->1"].seconds
    expected = analyse_seeds(seed_saes(3), MatchConfig(threshold=0.95))
    assert strict.shared_fraction == expected.shared_fraction
    assert strict.shared_fraction[0][1] < first.shared_fraction[0][1]
    # Another solver gives other assignments: nothing saved under the old one is reused.
    sparse = analyse_folder(tmp_path, MatchConfig(solver="sparse"))["model.layers.6.mlp"]
    assert sparse.pairs["0->1"].solver == "sparse"
    assert sparse.pairs["0->1"].seconds != first.pairs["0->1"].seconds


def test_unreadable_saved_pair_is_one_clear_error(tmp_path: Path) -> None:
    write_run(tmp_path, seed_saes(2, n=20))
    analyse_folder(tmp_path)
    (tmp_path / "model.layers.6.mlp" / "matches" / "seed0-seed1.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="delete it to match again"):
        analyse_folder(tmp_path)
