"""SAEs trained elsewhere, recorded as a run (`autointerp import-saes`, a study's
`[import_saes]`): every checkpoint format and layout is read, a checkpoint that cannot be used
is refused in one line with nothing stored, and the rest of a study runs on the imported SAEs.
The subject model is a small random GPT-2 (`tiny_models.py`); interop with the real sparsify
and SAELens libraries is in test_interop.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select
from tiny_models import TINY_GPT2_HOOKPOINT, TINY_GPT2_WIDTH, save_tiny_gpt2

from sae.checkpoint import SaeWeights, save_saelens, save_sparsify
from sae.checkpoint_import import ImportConfig, seed_folders
from sae.errors import UserError
from service.store.engine import Store, open_store, upgrade
from service.store.imported import record_import
from service.store.models import Job, MatchPair, Run, Sae, Score

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))
N_LATENTS = 64


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), home)


def random_weights(seed: int, cfg: dict, d_in: int = TINY_GPT2_WIDTH, threshold: bool = False):
    generator = torch.Generator().manual_seed(seed)
    encoder = torch.randn(N_LATENTS, d_in, generator=generator)
    return SaeWeights(
        encoder_weight=encoder,
        encoder_bias=torch.zeros(N_LATENTS),
        W_dec=encoder / encoder.norm(dim=1, keepdim=True),
        b_dec=torch.zeros(d_in),
        cfg=cfg,
        threshold=torch.full((N_LATENTS,), 0.1) if threshold else None,
    )


# sparsify's own cfg.json keys (no "architecture"; "activation" says topk or groupmax).
SPARSIFY_CFG = {
    "activation": "groupmax",
    "expansion_factor": 2,
    "normalize_decoder": True,
    "num_latents": 0,
    "k": 4,
    "multi_topk": False,
    "skip_connection": False,
    "transcode": False,
}


def sparsify_layout(root: Path, seeds=(0, 1)) -> Path:
    """sparsify's multi-seed layout: RUN/<hookpoint in the base model>/seed<N>/."""
    for seed in seeds:
        save_sparsify(root / "h.1.mlp" / f"seed{seed}", random_weights(seed, SPARSIFY_CFG))
    return root


def saelens_folders(root: Path, architecture: str = "jumprelu") -> list[str]:
    folders = []
    for seed in (3, 5):
        folder = root / f"seed{seed}"
        cfg = {"architecture": architecture, "apply_b_dec_to_input": True}
        save_saelens(folder, random_weights(seed, cfg, threshold=architecture == "jumprelu"))
        folders.append(str(folder))
    return folders


def test_seed_folders_from_each_layout(tmp_path: Path):
    root = sparsify_layout(tmp_path / "sparsify")
    found = seed_folders(ImportConfig(hookpoint=TINY_GPT2_HOOKPOINT, folders=[str(root)]))
    assert found == {0: root / "h.1.mlp" / "seed0", 1: root / "h.1.mlp" / "seed1"}
    folders = saelens_folders(tmp_path / "lens")
    assert seed_folders(ImportConfig(folders=folders)) == {3: Path(folders[0]), 5: Path(folders[1])}
    chosen = ImportConfig(folders=folders, seeds=[7, 8])
    assert sorted(seed_folders(chosen)) == [7, 8]
    with pytest.raises(UserError, match="2 seeds for 1 folders"):
        seed_folders(ImportConfig(folders=folders[:1], seeds=[1, 2]))


def test_import_records_sparsify_and_saelens(store: Store, tiny_gpt2: Path, tmp_path: Path, home):
    root = sparsify_layout(tmp_path / "sparsify")
    config = ImportConfig(model=str(tiny_gpt2), hookpoint=TINY_GPT2_HOOKPOINT, folders=[str(root)])
    saes = record_import(store, "theirs", config, home)
    assert [(s.seed, s.layout, s.architecture, s.k) for s in saes] == [
        (0, "sparsify", "groupmax", 4),
        (1, "sparsify", "groupmax", 4),
    ]
    lens = ImportConfig(
        model=str(tiny_gpt2),
        hookpoint=TINY_GPT2_HOOKPOINT,
        folders=saelens_folders(tmp_path / "lens"),
    )
    record_import(store, "lens", lens, home)
    with store.read_session() as session:
        rows = session.execute(
            select(Run.name, Sae.seed, Sae.architecture, Sae.d_in, Sae.n_latents, Sae.fvu)
            .join(Run, Run.id == Sae.run_id)
            .order_by(Run.name, Sae.seed)
        ).all()
        latents = session.scalar(select(func.sum(Sae.n_latents)))
    assert [tuple(row) for row in rows] == [
        ("lens", 3, "jumprelu", TINY_GPT2_WIDTH, N_LATENTS, None),
        ("lens", 5, "jumprelu", TINY_GPT2_WIDTH, N_LATENTS, None),
        ("theirs", 0, "groupmax", TINY_GPT2_WIDTH, N_LATENTS, None),
        ("theirs", 1, "groupmax", TINY_GPT2_WIDTH, N_LATENTS, None),
    ]
    assert latents == 4 * N_LATENTS


def _wrong_width(root: Path) -> list[str]:
    for seed in (0, 1):
        save_sparsify(root / f"seed{seed}", random_weights(seed, SPARSIFY_CFG, d_in=48))
    return [str(root)]


def _half_written(root: Path) -> list[str]:
    sparsify_layout(root)
    (root / "h.1.mlp" / "seed1" / "sae.safetensors").unlink()
    return [str(root)]


def _truncated(root: Path) -> list[str]:
    sparsify_layout(root)
    weights = root / "h.1.mlp" / "seed0" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return [str(root)]


def _unknown_architecture(root: Path) -> list[str]:
    save_saelens(root / "seed0", random_weights(0, {"architecture": "gated"}))
    save_saelens(root / "seed1", random_weights(1, {"architecture": "gated"}))
    return [str(root / "seed0"), str(root / "seed1")]


def _rescaled(root: Path) -> list[str]:
    cfg = {"architecture": "topk", "k": 4, "rescale_acts_by_decoder_norm": True}
    save_saelens(root / "seed0", random_weights(0, cfg))
    save_saelens(root / "seed1", random_weights(1, cfg))
    return [str(root)]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_wrong_width, "has d_in 48 but transformer.h.1.mlp outputs width 32"),
        (_half_written, "is half written: it has cfg.json but neither"),
        (_truncated, "is corrupt or truncated"),
        (_unknown_architecture, "unknown SAE architecture 'gated'"),
        (_rescaled, "sets rescale_acts_by_decoder_norm=True, which this tool cannot encode"),
    ],
)
def test_unusable_checkpoints_are_refused_in_one_line(
    make, message: str, tiny_gpt2: Path, tmp_path: Path
):
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(db_url)
    folders = make(tmp_path / "saes")
    command = [AUTOINTERP, "import-saes", "--run", "bad", "--model", str(tiny_gpt2)]
    result = subprocess.run(
        [*command, "--hookpoint", TINY_GPT2_HOOKPOINT, *folders],
        capture_output=True,
        text=True,
        env={**os.environ, "AUTOINTERP_DB": db_url},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    store = open_store(db_url)
    try:
        with store.read_session() as session:
            assert session.scalar(select(func.count()).select_from(Run)) == 0
            assert session.scalar(select(func.count()).select_from(Sae)) == 0
    finally:
        store.dispose()


IMPORT_STUDY = """
name = "imported"
out = "out"

[import_saes]
model = "{model}"
hookpoint = "transformer.h.1.mlp"
folders = ["sparsify"]

[cache]
tokens = 2048
window = 16
chunk_len = 64
quantile_bins = 2
per_quantile_bin = 2
negatives = 6

[queue]
selection = "sample"
latents = 4

[score.job]
explainers = ["token_baseline"]
scorers = ["embedding"]
n_explain_top = 4
n_explain_quantile = 2
n_positive = 4
n_negative = 4

[report]
html = "out/report.html"
"""


def test_study_runs_on_imported_saes(store_url: str, tiny_gpt2: Path, tmp_path: Path):
    sparsify_layout(tmp_path / "sparsify")
    study = tmp_path / "study.toml"
    study.write_text(IMPORT_STUDY.format(model=tiny_gpt2))
    result = subprocess.run(
        [AUTOINTERP, "run", str(study)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "AUTOINTERP_DB": store_url},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "import: recorded 2 SAEs (seed 0: sparsify groupmax" in result.stdout
    assert (tmp_path / "out" / "report.html").is_file()
    resolved = json.loads((tmp_path / "out" / "study_config.json").read_text())
    assert resolved["import_saes"]["folders"] == [str(tmp_path / "sparsify")]
    store = open_store(store_url)
    try:
        with store.read_session() as session:
            assert session.scalar(select(func.count()).select_from(MatchPair)) == 2
            jobs = session.scalars(select(Job.state)).all()
            assert len(jobs) == 4 and set(jobs) == {"done"}
            assert session.scalar(select(func.count()).select_from(Score)) > 0
    finally:
        store.dispose()


def test_study_with_train_and_import_is_refused(tmp_path: Path):
    study = tmp_path / "study.toml"
    study.write_text('name = "x"\nout = "o"\n[train]\nepochs = 1\n[import_saes]\nfolders = ["a"]\n')
    result = subprocess.run([AUTOINTERP, "run", str(study)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "[train] and [import_saes] both given" in result.stderr
