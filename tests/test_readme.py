"""The README's step-by-step block, parsed from README.md and run in order on tiny sizes, so
the README and the commands cannot drift apart: `train --run` and `match --run` record what
they make, and `cache`, `queue`, `score`, `report` and `show` work on that run."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))
README = Path(__file__).resolve().parents[1] / "README.md"
URL = "http://127.0.0.1:8011/v1"

# What makes the block tiny; each must occur in it, so an edit of the block breaks the test
# instead of silently running the full sizes.
TINY = {
    "--max-tokens 400000": "--max-tokens 4096",
    "--n-latents 1152 --k 8 --seeds 0,1,2 --epochs 5": (
        "--n-latents 64 --k 4 --seeds 0,1 --epochs 2"
    ),
    "--tokens 100000 --window 32": "--tokens 2048 --window 16 --chunk-len 64",
    # A campaign without an LLM, so that scoring takes seconds; `calibrate` asks the server.
    "--selection stratified --latents 50": (
        "--selection sample --latents 2 --explainers token_baseline --scorers embedding"
    ),
    "--model smollm2\n": "--model smollm2 --explainers token_baseline --scorers detection "
    "--n-examples 4\n",
    "--workers 8": "--workers 2",
}


def step_by_step_block() -> list[str]:
    text = README.read_text()
    found = re.search(r"a study step by step.*?```bash\n(.*?)```", text, re.DOTALL)
    assert found, "README has no step-by-step block"
    block = found.group(1)
    for original, tiny in TINY.items():
        assert original in block, f"the step-by-step block no longer has {original!r}"
        block = block.replace(original, tiny, 1)
    return [line for line in block.splitlines() if line.strip()]


def test_block_is_the_flow_without_a_study_file():
    lines = step_by_step_block()
    assert all(line.startswith("autointerp ") for line in lines)
    assert not any(line.startswith("autointerp run ") for line in lines)
    assert any("train " in line and "--run x" in line for line in lines)
    assert "autointerp match --run x" in lines


@pytest.mark.slow
@pytest.mark.vllm
def test_readme_step_by_step_runs_in_order(tmp_path: Path, vllm_url: str):
    env = {**os.environ, "AUTOINTERP_DB": f"sqlite:///{tmp_path / 'store.db'}"}
    outputs = {}
    for line in step_by_step_block():
        args = shlex.split(line)[1:]
        if args[:2] == ["llm", "serve"]:
            continue  # the session's vLLM server (the vllm_url fixture) serves instead
        args = [vllm_url if arg == URL else arg for arg in args]
        result = subprocess.run(
            [AUTOINTERP, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900
        )
        assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
        outputs[line] = result.stdout
    assert (tmp_path / "runs" / "x" / "model.layers.6.mlp" / "seed1" / "sae.safetensors").is_file()
    assert (tmp_path / "report.html").is_file()
    training = next(out for line, out in outputs.items() if " train " in f" {line} ")
    assert "recorded 2 SAEs as run 'x'" in training
    status = outputs["autointerp status"]
    assert "done" in status
