"""Running DVC stages from other front doors (the Prefect flow), so that they and `dvc repro` never disagree."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

_RAN = re.compile(r"Running stage '([^']+)'")
_SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")


class StageFailed(RuntimeError):
    """`dvc repro` of a stage exited non-zero; the message carries the end of its output."""


@dataclass
class StageRun:
    stage: str
    ran: list[str]  # stages DVC actually executed (the stage itself, or upstream ones it needed)
    skipped: list[str]
    output: str

    @property
    def executed(self) -> bool:
        return self.stage in self.ran


def stage_names(workdir: str | Path = ".") -> list[str]:
    """The stages of dvc.yaml in the order they are written (which is their run order here)."""
    return list(yaml.safe_load((Path(workdir) / "dvc.yaml").read_text())["stages"])


def dvc_executable() -> str:
    # Prefer the dvc next to this interpreter, so a flow started from the venv uses the venv's DVC.
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def reproduce_stage(stage: str, workdir: str | Path = ".",
                    on_line: Callable[[str], None] | None = None) -> StageRun:
    """`dvc repro <stage>`, streaming each output line to `on_line`; raises StageFailed on failure."""
    cmd = [dvc_executable(), "repro", stage]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    # Stage commands (`tgm ...`) must resolve to this environment's entry point.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if on_line:
                on_line(line)
    output = "\n".join(lines)
    if proc.returncode != 0:
        tail = "\n".join(lines[-20:])
        raise StageFailed(f"dvc repro {stage} failed (exit {proc.returncode}):\n{tail}")
    return StageRun(stage=stage, ran=_RAN.findall(output), skipped=_SKIPPED.findall(output), output=output)


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds this workspace."""


@contextlib.contextmanager
def workspace_lock(workdir: str | Path, wait_s: float = 0.0, poll_s: float = 1.0):
    """Hold an exclusive lock on the workspace while a pipeline run reproduces it.

    Two runs of `dvc repro` in one workspace would fail one of them at a random stage on DVC's own lock; with
    this lock the second run waits up to `wait_s` seconds, then stops before touching anything, saying who
    holds the workspace. The lock is an flock on .dvc/tmp/tgm-pipeline.lock: the kernel drops it when its
    holder dies, so a crashed run never leaves the workspace locked.
    """
    import fcntl
    import time

    path = Path(workdir) / ".dvc" / "tmp" / "tgm-pipeline.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.seek(0)
                    holder = f.read().strip() or "another process"
                    raise WorkspaceBusy(f"workspace {Path(workdir).resolve()} is busy: {holder} is reproducing it; "
                                        f"waited {wait_s:.0f} s (raise the wait, or try again when it finishes)") \
                        from None
                time.sleep(poll_s)
        f.seek(0)
        f.truncate()
        f.write(f"pipeline run pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
