"""Interop with the real libraries: `eai-sparsify` trains a tiny SAE of two seeds on CPU
through its Python API, and `sae-lens` saves a TopK and a JumpReLU SAE with its own
`save_model`; each is imported, matched, cached, queued and scored (token-baseline explainer,
embedding scorer) and reported, end to end on SQLite and PostgreSQL.

The checkpoints are written by `interop_checkpoints.py` running in `.venv-interop`
(`make interop`), which keeps these libraries and their dependencies out of `.venv`."""

import subprocess
from pathlib import Path

import pytest
import torch
from planted_store import LLM_FREE_JOB
from safetensors.torch import load_file
from sqlalchemy import func, select
from tiny_models import TINY_GPT2_HOOKPOINT, save_tiny_gpt2

from sae.architectures import encode
from sae.checkpoint import load_sae
from sae.checkpoint_import import ImportConfig
from sae.latent_stats import CacheConfig
from sae.matching import MatchConfig
from service.cache.stage import cache_run
from service.config import LLMConfig, QueueConfig, ScoreConfig, ScoringConfig
from service.report import make_report
from service.scoring.campaign import open_campaign
from service.scoring.worker import run_score
from service.store.engine import Store
from service.store.imported import record_import
from service.store.matches import record_matching
from service.store.models import Job, Latent, Run, Sae, Score
from service.store.sampling import queue_run

ROOT = Path(__file__).resolve().parents[1]
INTEROP_PYTHON = ROOT / ".venv-interop" / "bin" / "python"
# Run name -> (what `import-saes` is given, relative to the script's output; layout; arch).
RUNS = {
    "sparsify": (["sparsify/run"], "sparsify", "topk"),
    "saelens_topk": (["saelens_topk"], "saelens", "topk"),
    "saelens_jumprelu": (
        ["saelens_jumprelu/seed0", "saelens_jumprelu/seed1"],
        "saelens",
        "jumprelu",
    ),
}
SEED0 = {
    "sparsify": "sparsify/run/h.1.mlp/seed0",
    "saelens_topk": "saelens_topk/seed0",
    "saelens_jumprelu": "saelens_jumprelu/seed0",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, home: Path) -> tuple[Path, Path]:
    """(tiny GPT-2 folder, folder the real libraries wrote their checkpoints to)."""
    if not INTEROP_PYTHON.is_file():
        pytest.fail(f"{INTEROP_PYTHON} is missing: `make interop` builds it")
    model = save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), home)
    out = tmp_path_factory.mktemp("interop")
    script = ROOT / "tests" / "interop_checkpoints.py"
    result = subprocess.run(
        [str(INTEROP_PYTHON), str(script), str(model), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return model, out


def test_encode_agrees_with_each_library(checkpoints: tuple[Path, Path]):
    _, out = checkpoints
    reference = load_file(out / "reference.safetensors")
    for name, folder in SEED0.items():
        theirs = reference[name]
        assert 0 < float((theirs > 0).float().mean()) < 1, name
        torch.testing.assert_close(encode(load_sae(out / folder), reference["x"]), theirs)


def test_import_match_cache_score_report(
    store: Store, store_url: str, checkpoints: tuple[Path, Path], home: Path
):
    model, out = checkpoints
    cache = CacheConfig(
        tokens=2048, window=16, chunk_len=64, quantile_bins=2, per_quantile_bin=2, negatives=6
    )
    for run, (folders, layout, architecture) in RUNS.items():
        config = ImportConfig(
            model=str(model),
            hookpoint=TINY_GPT2_HOOKPOINT,
            folders=[str(out / folder) for folder in folders],
        )
        saes = record_import(store, run, config, home)
        assert [(s.seed, s.layout, s.architecture) for s in saes] == [
            (0, layout, architecture),
            (1, layout, architecture),
        ]
        matches = record_matching(store, run, MatchConfig())
        assert sorted(matches[TINY_GPT2_HOOKPOINT]) == [(0, 1), (1, 0)]
        cache_run(store, run, home, cache, show_progress=False)
        queued = queue_run(
            store,
            run,
            lambda session: open_campaign(
                session, ScoreConfig.model_validate(LLM_FREE_JOB), LLMConfig()
            ),
            QueueConfig(selection="sample", latents=3),
        )
        assert queued.inserted == 3
    stats = run_score(store_url, home, ScoringConfig(workers=2))
    assert stats.completed == 3 * len(RUNS) and stats.failed == 0
    with store.read_session() as session:
        assert set(session.scalars(select(Job.state))) == {"done"}
        scored = session.execute(
            select(Run.name, func.count(Score.id))
            .join(Sae, Sae.run_id == Run.id)
            .join(Latent, Latent.sae_id == Sae.id)
            .join(Score, Score.latent_id == Latent.id)
            .group_by(Run.name)
        ).all()
    assert {name: n > 0 for name, n in scored} == dict.fromkeys(RUNS, True)
    for run in RUNS:
        report = make_report(store, run).report
        (hookpoint,) = report.hookpoints
        assert hookpoint.firing_statistics and len(hookpoint.pairs) == 2
        assert [section.scorer for section in hookpoint.scorers] == ["embedding"]
