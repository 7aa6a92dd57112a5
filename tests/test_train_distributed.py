"""Training under torchrun with 2 gloo processes on real SmolLM2 activations: the same SAEs
as one process at the same global batch, and a resume after one rank is killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from sae.train import RESULT_FILE, STATE_FILE

BIN = Path(sys.executable).parent
HOOKPOINT = "model.layers.6.mlp"
SEEDS = (0, 1)
# Float sums reassociate across processes (the all-reduced gradients and batch variance),
# so parameters agree to rounding, not bit for bit. In float32: bfloat16's rounding of the
# encoder product can flip a near-tie in the latents it picks, and then the runs part ways.
TOLERANCE = 2e-6


def train_args(cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--out",
        str(out),
        "--from-cache",
        str(cache),
        "--latents",
        "256",
        "--k",
        "8",
        "--seeds",
        ",".join(map(str, SEEDS)),
        "--batch-tokens",
        "2048",
        "--precision",
        "float32",
        *extra,
    ]


def torchrun() -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "service.cli"]


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    # A rank's thread count: two processes on two cores, not two cores each.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def assert_same_saes(a: Path, b: Path) -> None:
    for seed in SEEDS:
        one = load_file(a / HOOKPOINT / f"seed{seed}" / "sae.safetensors")
        two = load_file(b / HOOKPOINT / f"seed{seed}" / "sae.safetensors")
        assert one.keys() == two.keys()
        for name in one:
            difference = float((one[name] - two[name]).abs().max())
            assert difference <= TOLERANCE, (seed, name, difference)


def test_two_processes_train_what_one_trains(
    smollm2_activation_cache: Path, tmp_path: Path
) -> None:
    single = run([str(BIN / "autointerp"), *train_args(smollm2_activation_cache, tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    double = run([*torchrun(), *train_args(smollm2_activation_cache, tmp_path / "two")])
    assert double.returncode == 0, double.stderr
    # One report, from rank 0.
    assert double.stdout.count("trained SAEs") == 1, double.stdout
    assert_same_saes(tmp_path / "one", tmp_path / "two")
    # The metric lines are the processes' means: the same FVU as one process, to rounding.
    for seed in SEEDS:
        name = f"{HOOKPOINT}/seed{seed}/metrics.jsonl"
        ones = (tmp_path / "one" / name).read_text().splitlines()
        twos = (tmp_path / "two" / name).read_text().splitlines()
        assert len(ones) == len(twos) > 0
        for one, two in zip(ones, twos, strict=True):
            fvu_one, fvu_two = json.loads(one)["fvu"], json.loads(two)["fvu"]
            assert abs(fvu_one - fvu_two) <= 1e-5 * fvu_one, (seed, one, two)


def test_killed_rank_resumes_from_the_last_checkpoint(
    smollm2_activation_cache: Path, tmp_path: Path
) -> None:
    # Three epochs and a checkpoint every step (0.0001 minutes), so one is on disk early.
    args = train_args(smollm2_activation_cache, tmp_path / "two", "--epochs", "3")
    checkpointed = [*args, "--checkpoint-minutes", "0.0001"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [*torchrun(), *checkpointed],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    state = tmp_path / "two" / STATE_FILE
    deadline = time.monotonic() + 300
    while not state.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert launcher.poll() is None, launcher.communicate()
    ranks = subprocess.run(
        ["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(ranks) == 2, ranks
    os.kill(int(ranks[1]), signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert not (tmp_path / "two" / RESULT_FILE).exists()

    resumed = run([*torchrun(), *checkpointed])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step" in resumed.stdout, resumed.stdout
    straight = run(
        [
            str(BIN / "autointerp"),
            *train_args(smollm2_activation_cache, tmp_path / "one", "--epochs", "3"),
        ]
    )
    assert straight.returncode == 0, straight.stderr
    assert_same_saes(tmp_path / "one", tmp_path / "two")
