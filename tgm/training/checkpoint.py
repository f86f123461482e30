"""Crash-safe checkpoints: one training-state file, replaced atomically, written from a snapshot by a background
thread so that training goes on meanwhile. A checkpoint resumes only a run with the same fingerprint (objective,
device kind, params, model config, training data), so a changed experiment never picks up stale state, nor a
CPU run a GPU's (its optimizer is the fused one, and its numbers are the GPU's).

The training loop sees only `Checkpoints`: `load`, `due`, `save`, `wait`. The stages build one (tgm.training.
stages); the study's short fits take none, so this module is no dependency of theirs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import torch

from tgm.io import atomic_file
from tgm.tokens import TokenFile, TokenFiles

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"


def fingerprint_of(*parts) -> str:
    """A digest of what a checkpoint belongs to: token files and arrays by content, the rest as JSON."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, TokenFile | TokenFiles):  # hashed as the int64 array it reads, block by block
            for block in part.blocks():
                h.update(block.astype(np.int64).tobytes())
        elif isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def snapshot(obj):
    """A copy of a training state that later steps cannot change, on the host. A CUDA tensor is copied into
    pinned memory without waiting: the copy is queued behind the step that made it, before any later one."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            host = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
            return host.copy_(obj.detach(), non_blocking=True)
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj  # numbers, strings, None: immutable


class Checkpoints:
    """`directory`/checkpoint.pt for the run of `fingerprint`, every `every` optimizer steps (0: at epoch ends
    only), written by the main process only."""

    def __init__(self, directory: str | Path, fingerprint: str, every: int, device: torch.device, main: bool = True):
        self.directory, self.fingerprint, self.every = Path(directory), fingerprint, every
        self.path = self.directory / CHECKPOINT_FILE
        self.device, self.main = device, main
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            log.warning("%s belongs to other params or data; starting from scratch", self.path)
            return None
        log.info("resuming from %s", self.path)
        return state

    def due(self, step: int) -> bool:
        return self.main and bool(self.every) and step % self.every == 0

    def save(self, state: dict) -> None:
        """Snapshot `state` now and write it in the background, after the write in flight (if any) ends."""
        if not self.main:
            return
        self.wait()
        copy = snapshot(state)
        copied = None
        if self.device.type == "cuda":  # on the training device's stream, which need not be the current device's
            copied = torch.cuda.current_stream(self.device).record_event()
        self.thread = threading.Thread(target=self._in_background, args=(copy, copied), name="tgm-checkpoint")
        self.thread.start()

    def _in_background(self, state: dict, copied) -> None:
        try:
            if copied is not None:
                copied.synchronize()
            self.write(state)
        except BaseException as e:  # noqa: BLE001 (handed to the training thread, which re-raises it)
            self.error = e

    def write(self, state: dict) -> None:
        """The file itself, replaced atomically and flushed to disk (in the writer thread)."""
        with atomic_file(self.path, "wb", durable=True) as f:
            torch.save({**state, "fingerprint": self.fingerprint}, f)

    def wait(self) -> None:
        """Let the write in flight end; raise its error here, in the training thread."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
