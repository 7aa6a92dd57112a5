"""`autointerp train` and `autointerp cache-activations` as a user meets them: real
subprocesses, exit codes, one-line errors, Ctrl-C then resume."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sae.checkpoint import load_sae
from sae.train import RESULT_FILE, STATE_FILE

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))
HOOKPOINT = "model.layers.6.mlp"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AUTOINTERP, *args], capture_output=True, text=True, timeout=900)


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        # The other range checks behind these are tested in-process (test_architectures).
        (["--latents", "64", "--k", "65"], "--k 65 is out of range for 64 latents"),
        (["--seeds", "0,x"], "--seeds '0,x' is not a comma-separated list"),
        (["--from-cache", "/nonexistent/cache"], "is not an activation cache"),
        (["--hookpoint", "model.layers.6.mlpp"], "closest: model.layers.6.mlp"),
        # This machine has no GPU (the suite runs on CPU-only torch).
        (["--device", "cuda"], "--device cuda, but torch sees no CUDA device"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(args: list[str], fragment: str, tmp_path: Path):
    out = tmp_path / "out"
    assert_one_line_error(run_cli("train", "--out", str(out), *args), fragment)
    assert not out.exists()


def train_args(cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--from-cache",
        str(cache),
        "--out",
        str(out),
        "--latents",
        "256",
        "--k",
        "8",
        "--seeds",
        "0,1",
        "--batch-tokens",
        "1024",
        *extra,
    ]


def test_train_from_cache_then_corrupt_checkpoint(smollm2_activation_cache: Path, tmp_path: Path):
    out = tmp_path / "run"
    result = run_cli(*train_args(smollm2_activation_cache, out))
    assert result.returncode == 0, result.stderr
    assert "FVU" in result.stdout and "tokens/s" in result.stdout
    for seed in (0, 1):
        assert load_sae(out / HOOKPOINT / f"seed{seed}").n_latents == 256
    assert (out / RESULT_FILE).is_file() and (out / "train_config.json").is_file()

    again = run_cli(*train_args(smollm2_activation_cache, out))
    assert again.returncode == 0 and "already holds this finished run" in again.stdout

    changed = run_cli(*train_args(smollm2_activation_cache, out, "--epochs", "2"))
    assert_one_line_error(changed, "epochs 1 -> 2")

    state = out / STATE_FILE
    state.write_bytes(state.read_bytes()[:1000])
    before = snapshot(out)
    assert_one_line_error(
        run_cli(*train_args(smollm2_activation_cache, out)), "corrupt or truncated"
    )
    assert snapshot(out) == before


def test_ctrl_c_checkpoints_and_the_same_command_resumes(
    smollm2_activation_cache: Path, tmp_path: Path
):
    out = tmp_path / "run"
    args = train_args(smollm2_activation_cache, out, "--epochs", "10")
    process = subprocess.Popen(
        [AUTOINTERP, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = out / HOOKPOINT / "seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not metrics.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 130, stderr
    assert "interrupted at step" in stderr and "rerun the same command" in stderr
    assert (out / STATE_FILE).is_file() and not (out / RESULT_FILE).exists()
    assert load_sae(out / HOOKPOINT / "seed1").n_latents == 256

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step" in resumed.stdout
    assert (out / RESULT_FILE).is_file()


def test_cache_activations_command(tmp_path: Path):
    folder = tmp_path / "cache"
    result = run_cli("cache-activations", "--out", str(folder), "--tokens", "1024")
    assert result.returncode == 0, result.stderr
    assert "1,024 tokens" in result.stdout and "model.layers.6.mlp (576)" in result.stdout
    assert (folder / f"{HOOKPOINT}.npy").is_file()
    assert_one_line_error(
        run_cli("cache-activations", "--out", str(tmp_path / "x"), "--dtype", "float8"),
        "not supported",
    )
