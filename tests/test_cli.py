"""The command line as a user meets it: real subprocesses, exit codes, one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AUTOINTERP, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["hookpoints", "no-such-model-xyz"], "unknown model 'no-such-model-xyz'"),
        (["hookpoints", "./missing-folder"], "does not exist"),
        (["demo", "--hookpoint", "model.layers.6.mlpp"], "closest: model.layers.6.mlp"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], fragment: str):
    assert_one_line_error(run_cli(*args), fragment)


def test_hookpoints_lists_modules():
    result = run_cli("hookpoints", "smollm2", "--contains", "layers.6.mlp")
    assert result.returncode == 0, result.stderr
    assert "model.layers.6.mlp" in result.stdout.split()


def test_demo_reports_real_numbers():
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    assert "activations identical" in result.stdout
    assert "True" in result.stdout
    assert "tokens/s" in result.stdout
