"""Start a real vLLM OpenAI-compatible server for a local model and wait until it answers.

vLLM lives in its own virtual environment (`make vllm` builds `.venv-vllm`: it pins its own
torch and transformers). The server runs through the module entry point (the `vllm` console
script of the CPU build fails), in its own process group so that stopping it also stops
its engine processes. Its output goes to a log file whose tail is shown when it dies.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sae.errors import UserError
from sae.precision import Precision, compute_dtype
from sae.subject_model import resolve_model

DEFAULT_PORT = 8011
DEFAULT_HOST = "127.0.0.1"
READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0
# Repository root: `make vllm` builds .venv-vllm there.
REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = ".venv-vllm"


def find_vllm_python(python: Path | None = None) -> Path:
    """The Python that has vLLM: `python` if given, else `.venv-vllm` here or in the repo."""
    candidates = (
        [python]
        if python is not None
        else [Path.cwd() / VLLM_VENV / "bin" / "python", REPO_ROOT / VLLM_VENV / "bin" / "python"]
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if python is not None:
        raise UserError(f"no Python at {python}; pass --python PATH/TO/VENV/bin/python")
    raise UserError(
        f"no vLLM environment at {candidates[-1].parents[1]}; run `make vllm` or pass "
        "--python with a Python that has vllm installed"
    )


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, port)) == 0


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def serving_dtype(precision: Precision) -> str:
    """vLLM's `--dtype` for `precision`, decided as training's products are."""
    import torch

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return str(compute_dtype(precision, device_type)).removeprefix("torch.")


@dataclass
class VllmServer:
    """A running vLLM server process and where it answers."""

    process: subprocess.Popen[bytes]
    url: str
    model: str
    log_path: Path
    # The key the server requires, if any: kept in memory only, never shown.
    api_key: str | None = field(default=None, repr=False)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL if it has not ended in time."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass


def start_server(
    model: str,
    home: Path,
    *,
    python: Path | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_model_len: int = 4096,
    kv_cache_gb: int = 2,
    log_path: Path | None = None,
    extra_args: tuple[str, ...] = (),
    api_key: str | None = None,
    precision: Precision = "auto",
) -> VllmServer:
    """Launch vLLM serving `model` (embedded name, folder or hub id) under the name `model`;
    with `api_key`, every /v1 request must carry it (handed over in the environment, so it
    never shows in the process list). `precision` is the model's dtype; `auto`: bfloat16 on a
    GPU that has it or where this CPU multiplies it measurably faster, else float32 (vLLM's
    CPU build runs bfloat16 without bfloat16 units too, several times slower)."""
    interpreter = find_vllm_python(python)
    if port_in_use(host, port):
        raise UserError(f"port {port} on {host} is already in use; pass --port with a free one")
    source = resolve_model(model, home)
    served_name = model if isinstance(source, str) else Path(model).name
    if log_path is None:
        handle, name = tempfile.mkstemp(prefix="vllm-", suffix=".log")
        os.close(handle)
        log_path = Path(name)
    command = [
        str(interpreter),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(source),
        "--served-model-name",
        served_name,
        "--dtype",
        serving_dtype(precision),
        "--max-model-len",
        str(max_model_len),
        "--host",
        host,
        "--port",
        str(port),
        # JSON answers without free whitespace: given the choice, a small model can fill its
        # whole token budget with newlines and indentation before the answers are complete.
        "--structured-outputs-config",
        json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
        *extra_args,
    ]
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb)}
    environment.pop("VLLM_API_KEY", None)
    if api_key:
        environment["VLLM_API_KEY"] = api_key
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
        )
    return VllmServer(process, f"http://{host}:{port}/v1", served_name, log_path, api_key)


def wait_ready(server: VllmServer, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll `/v1/models` until the server lists its model; a dead or slow server is an error
    that quotes the end of its log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.running():
            raise UserError(
                f"vLLM exited with status {server.process.returncode} before it was ready "
                f"(log {server.log_path}: {server.log_tail()})"
            )
        try:
            headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
            response = httpx.get(f"{server.url}/models", headers=headers, timeout=5.0)
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    server.stop()
    raise UserError(
        f"vLLM was not ready after {timeout_s:.0f} s (log {server.log_path}: "
        f"{server.log_tail()}); check the log"
    )


@contextmanager
def running_server(
    model: str,
    home: Path,
    *,
    python: Path | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    log_path: Path | None = None,
    api_key: str | None = None,
    precision: Precision = "auto",
) -> Iterator[VllmServer]:
    """A ready vLLM server for the `with` block, stopped when the block ends."""
    server = start_server(
        model,
        home,
        python=python,
        host=host,
        port=port,
        log_path=log_path,
        api_key=api_key,
        precision=precision,
    )
    try:
        wait_ready(server)
        yield server
    finally:
        server.stop()


def serve_forever(server: VllmServer) -> int:
    """Wait on the server until it exits or the user interrupts (Ctrl-C, or SIGTERM from a
    process manager); then stop it, so that no vLLM outlives this command."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return server.process.wait()
    except KeyboardInterrupt:
        print("stopping vLLM", file=sys.stderr)
        return 0
    finally:
        server.stop()
