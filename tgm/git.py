"""Which commit made an output: for the provenance a model, a model card or a champion records."""

from __future__ import annotations

import subprocess


def git_commit() -> str:
    """HEAD's commit, with "-dirty" when tracked files differ from it; "unknown" outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
