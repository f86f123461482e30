"""Running DVC stages from other front doors (the Prefect flow), so that they and `dvc repro` never disagree."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from tgm.errors import UserError
from tgm.io import write_bytes

_RAN = re.compile(r"Running stage '([^']+)'")
_SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
_REFUSAL = re.compile(r"^tgm [\w-]+: error: (.*)$")


class StageFailed(RuntimeError):
    """`dvc repro` of a stage exited non-zero.

    `reason` is the stage's own error message when it refused deliberately (`tgm <stage>: error: ...`: the
    gate, bad data, bad params - the same again on a retry), else the end of the output (a crash).
    """

    def __init__(self, stage: str, returncode: int, output_lines: list[str]):
        self.stage, self.returncode = stage, returncode
        self.refusal = refusal(output_lines)
        self.reason = self.refusal or "\n".join(output_lines[-20:])
        super().__init__(f"dvc repro {stage} failed (exit {returncode}): {self.reason}")


def refusal(lines: list[str]) -> str | None:
    """The `tgm <stage>: error: ...` message in a stage's output (with its continuation lines), if any."""
    for i, line in enumerate(lines):
        m = _REFUSAL.search(line)
        if m:
            rest = [m.group(1)]
            for more in lines[i + 1 :]:
                if not more.startswith((" ", "\t")):
                    break
                rest.append(more.strip())
            return "\n".join(rest)
    return None


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


def reproduce_stage(stage: str, workdir: str | Path = ".", on_line: Callable[[str], None] | None = None) -> StageRun:
    """`dvc repro <stage>`, streaming each output line to `on_line`; raises StageFailed on failure."""
    cmd = [dvc_executable(), "repro", stage]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    # Stage commands (`tgm ...`) must resolve to this environment's entry point.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    lines: list[str] = []
    with subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if on_line:
                on_line(line)
    output = "\n".join(lines)
    if proc.returncode != 0:
        raise StageFailed(stage, proc.returncode, lines)
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
                    raise WorkspaceBusy(
                        f"workspace {Path(workdir).resolve()} is busy: {holder} is reproducing it; "
                        f"waited {wait_s:.0f} s (raise the wait, or try again when it finishes)"
                    ) from None
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


class BadOverride(UserError, ValueError):
    """A `key=value` parameter override that is malformed or that params.yaml's checks refuse."""


def parse_overrides(sets: list[str]) -> dict[str, object]:
    """`group.key=value` strings, as `dvc exp run -S` takes them; values are YAML (`0.1`, `true`, `[1, 2]`)."""
    out: dict[str, object] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key.count(".") != 1 or not all(key.split(".")):
            raise BadOverride(f"override {item!r}: expected group.key=value, e.g. finetune.lr=0.001")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise BadOverride(f"override {item!r}: the value is not valid YAML ({exc})") from None
    return out


@contextlib.contextmanager
def overridden_params(workdir: str | Path, overrides: dict[str, object]):
    """params.yaml with `overrides` applied for the duration of the block, then put back byte for byte.

    The overridden file is checked like every stage checks it (unknown keys, types, ranges), so a bad override
    stops the run before any stage starts. Comments and layout survive (DVC's round-trip YAML writer, the one
    `dvc exp run -S` uses).
    """
    from dvc.utils.serialize import modify_yaml

    from tgm.params import ParamsError, parse_params

    path = Path(workdir) / "params.yaml"
    if not overrides:
        yield
        return
    original = path.read_bytes()
    raw = yaml.safe_load(original) or {}
    for key, value in overrides.items():
        group, name = key.split(".")
        if not isinstance(raw.get(group, {}), dict):
            raise BadOverride(f"override {key}: params.yaml's {group} is not a group of parameters")
        raw.setdefault(group, {})[name] = value
    try:
        parse_params(raw)
    except ParamsError as exc:
        raise BadOverride(f"override refused: {exc}") from None
    try:
        with modify_yaml(path) as doc:
            for key, value in overrides.items():
                group, name = key.split(".")
                doc.setdefault(group, {})[name] = value
        yield
    finally:
        write_bytes(path, original)


def stale_stages(workdir: str | Path) -> set[str]:
    """The stages `dvc status` says are out of date (deps, params, outs or the command changed)."""
    from dvc.repo import Repo

    with Repo(str(workdir)) as repo:
        return {key.split(":")[-1] for key in repo.status()}


def metrics_diff(workdir: str | Path, target: str = "metrics/evaluate.json", rev: str = "HEAD") -> dict:
    """`dvc metrics diff <rev> --all` for one metrics file: {metric: {"old", "new", "diff"}}; {} without git."""
    from dvc.repo import Repo
    from dvc.scm import NoSCMError

    with Repo(str(workdir)) as repo:
        try:
            if repo.scm.no_commits:
                return {}
        except NoSCMError:
            return {}
        # An absolute target: DVC's API resolves relative ones against the current directory, not the repo.
        diff = repo.metrics.diff(a_rev=rev, all=True, targets=[str(Path(repo.root_dir) / target)])
        return diff.get("diff", {}).get(target, {})


def save_experiment(workdir: str | Path, name: str, message: str, stages: list[str] | None = None) -> str:
    """`dvc exp save -f -n NAME [stages]`: the workspace (params, dvc.lock, metrics, plots) as a DVC experiment.

    `stages` limits what DVC commits to those that finished: `exp save` otherwise commits every stage as it
    stands, which would record a failed stage (a refusing gate, say) as up to date in dvc.lock. Metrics and
    plots not yet tracked by git are included, so `dvc exp show` has them even before a first commit.
    """
    from dvc.repo import Repo
    from dvc.scm import NoSCMError

    # DVC's experiment executor opens the repository at the current directory, whatever Repo it is handed;
    # in-process (not `dvc exp save` in a subprocess) saves a second of start-up on every run.
    with contextlib.chdir(workdir), Repo(".") as repo:
        try:
            untracked = [
                p for p in repo.scm.untracked_files() if p.split("/")[0] in ("metrics", "plots", "reports", "dvclive")
            ]
        except NoSCMError:
            raise RuntimeError(f"{workdir} is not a git repository: DVC experiments need git") from None
        repo.experiments.save(
            targets=stages or None, name=name, force=True, include_untracked=untracked, message=message
        )
    return name


def push(workdir: str | Path, remote: str | None = None, on_line: Callable[[str], None] | None = None) -> str:
    """`dvc push` to `remote`, else the default remote; returns DVC's summary line."""
    cmd = [dvc_executable(), "push"] + (["-r", remote] if remote else [])
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    for line in lines:
        if on_line:
            on_line(line)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc push{' -r ' + remote if remote else ''} failed: " + "\n".join(lines[-10:]))
    return lines[-1] if lines else "pushed"
