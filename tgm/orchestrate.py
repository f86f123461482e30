"""Running DVC stages from other front doors (the Prefect flow), so that they and `dvc repro` never disagree."""
from __future__ import annotations

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
