"""Start `bentoml serve` on 127.0.0.1 for tests and benchmarks, and stop it again."""
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


def start(target: list[str], cwd: str | Path, env: dict | None = None,
          timeout_s: float = 120.0) -> tuple[subprocess.Popen, str, Path]:
    """`bentoml serve [target]` in cwd on a free loopback port; returns once /readyz answers 200.

    Returns the process, its base URL and its log file. The log goes to a file, not a pipe: a pipe nobody
    reads fills up and blocks the server mid-request.
    """
    import httpx

    port = free_port()
    log = Path(tempfile.gettempdir()) / f"tgm-bentoml-serve-{port}.log"
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    proc = subprocess.Popen([bentoml, "serve", *target, "--host", "127.0.0.1", "--port", str(port)], cwd=cwd,
                            env={**os.environ, **(env or {})}, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited early (log {log}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"bentoml serve did not become ready within {timeout_s:.0f} s (log {log})")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
