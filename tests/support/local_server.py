"""Start servers on 127.0.0.1 for tests and benchmarks (`bentoml serve`, `prefect server start`), and stop them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(
    cmd: list[str], cwd: str | Path, env: dict | None, name: str, ready_url: str | None = None, timeout_s: float = 120.0
) -> tuple[subprocess.Popen, Path]:
    """Start `cmd`; with `ready_url`, return once it answers 200 (else raise with the log's end).

    The log goes to a file, not a pipe: a pipe nobody reads fills up and blocks the server mid-request.
    `env` entries set to None are removed from the inherited environment.
    """
    import httpx

    fd, log_path = tempfile.mkstemp(prefix=f"tgm-{name}-", suffix=".log")
    os.close(fd)  # reopened below for the child; mkstemp's descriptor would otherwise leak
    log = Path(log_path)
    full_env = {**os.environ, **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    if ready_url is None:
        return proc, log
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited early (log {log}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return proc, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{name} did not answer {ready_url} within {timeout_s:.0f} s (log {log})")


def start(
    target: list[str], cwd: str | Path, env: dict | None = None, timeout_s: float = 120.0
) -> tuple[subprocess.Popen, str, Path]:
    """`bentoml serve [target]` in cwd on a free loopback port; returns (process, base URL, log) once ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    proc, log = start_process(
        [bentoml, "serve", *target, "--host", "127.0.0.1", "--port", str(port)],
        cwd,
        env,
        "bentoml-serve",
        f"{url}/readyz",
        timeout_s,
    )
    return proc, url, log


def start_prefect_server(home: str | Path, timeout_s: float = 180.0) -> tuple[subprocess.Popen, str, Path]:
    """`prefect server start` on a free loopback port with its own SQLite database under `home`.

    Returns (process, API URL, log). No UI, no telemetry; PREFECT_API_URL is cleared so the server never
    talks to another one.
    """
    home = Path(home)
    port = free_port()
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": None,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    prefect = str(Path(sys.executable).with_name("prefect"))
    api = f"http://127.0.0.1:{port}/api"
    proc, log = start_process(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        home,
        env,
        "prefect-server",
        f"{api}/health",
        timeout_s,
    )
    return proc, api, log


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
