"""The wheel works outside the repository: built from a copy of the source tree, installed
into a fresh virtual environment in a temporary folder, it finds its migrations and prompt
templates (package data) and runs `autointerp db upgrade`, `autointerp query "SELECT 1"` and
a prompt render from there. The dependencies (torch, transformers, ...) are not downloaded
again: the fresh environment sees .venv's site-packages through a .pth path line, which
(unlike a site directory) does not run .venv's editable-install hook."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(tmp_path: Path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    source = tmp_path / "source"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
        + ["--wheel-dir", str(dist), str(source)],
        tmp_path,
        env,
    )
    (wheel,) = dist.glob("autointerp-*.whl")

    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    purelib = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        tmp_path,
        env,
    ).strip()
    (Path(purelib) / "shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"])
    run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"]
        + ["--no-index", str(wheel)],
        tmp_path,
        env,
    )

    work = tmp_path / "elsewhere"
    work.mkdir()
    env["AUTOINTERP_DB"] = f"sqlite:///{work / 'store.db'}"
    where = run([str(python), "-c", "import service; print(service.__file__)"], work, env)
    assert where.startswith(str(fresh)), where
    autointerp = str(fresh / "bin" / "autointerp")
    assert "store upgraded from empty to revision" in run([autointerp, "db", "upgrade"], work, env)
    assert "1" in run([autointerp, "query", "SELECT 1", "--format", "csv"], work, env)
    render = (
        "from service.llm.prompts import windows_prompt; "
        "print(windows_prompt('explain_v2', [(['a', ' token', ' example'], [0, 1, 0])])"
        "[1]['content'])"
    )
    assert "a <<token>> example" in run([str(python), "-c", render], work, env)
