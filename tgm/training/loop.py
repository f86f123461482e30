"""The training loop, one for both objectives: `fit` trains a model over one `TrainState`.

AdamW (weight decay on matrices only), linear warmup then cosine decay, gradient clipping and accumulation,
bf16 autocast, optional torch.compile of the blocks, early stopping on the validation split with the best
weights restored. Under `torchrun --nproc_per_node=N` the same code trains with DistributedDataParallel (gloo
on CPU, nccl on GPU): `batch_size` is the global batch, each optimizer step splits it over ranks x grad_accum
micro-batches, so N processes follow the single-process run up to floating-point summation order.

The host waits for the device only when something needs a number: a curve point, the progress bar, a
checkpoint, an epoch's end. The checkpoints a stage passes in are written by a background thread; resumed,
a run ends with the same numbers as an uninterrupted one. Same params + same machine -> same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np
import torch

from tgm.errors import TrainingDiverged
from tgm.live import LOG_EVERY, LiveCurves
from tgm.model import TGM
from tgm.params import TrainParams
from tgm.tokens import nbytes
from tgm.training.data import Split, resident
from tgm.training.device import Dist
from tgm.training.objectives import Objective, evaluate_split
from tgm.training.run import Run

log = logging.getLogger(__name__)


class Checkpoints(Protocol):  # tgm.training.checkpoint.Checkpoints, which the stages pass in
    def load(self) -> dict | None: ...
    def due(self, step: int) -> bool: ...
    def save(self, state: dict) -> None: ...
    def wait(self) -> None: ...


@dataclass
class TrainState:
    """Where a run is and what it has learnt. With the weights, optimizer, schedule and random generators that
    `checkpoint_of` adds, exactly what a checkpoint holds."""

    epoch: int = 1
    batch: int = 0  # batches of `epoch` done
    step: int = 0  # optimizer steps done
    run_loss: float = 0.0  # summed training loss of `epoch` so far ...
    seen: int = 0  # ... over this many images
    history: list[dict] = field(default_factory=list)  # one row per epoch
    best: float = math.inf  # best validation loss of the objective's monitored metric
    best_epoch: int = 0
    best_state: dict | None = None  # the weights of best_epoch
    bad_epochs: int = 0  # epochs since `best` last improved
    stopped: bool = False
    epoch_order_rng: torch.Tensor | None = None  # the shuffle generator at the start of `epoch`
    curve_loss: tuple[float, int] = (0.0, 0)  # (summed loss, images) not yet drawn in the live curve


def checkpoint_of(run: Run, state: TrainState) -> dict:
    saved = {
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        **run.batches.state_dict(),
        **{f.name: getattr(state, f.name) for f in fields(TrainState)},  # shallow: no copy of best_state
    }
    if run.device.type == "cuda":
        saved["cuda_rng"] = torch.cuda.get_rng_state(run.device)
    return saved


def resume(run: Run, checkpoints: Checkpoints | None) -> TrainState:
    """The state of the last checkpoint, with weights, optimizer and generators restored; or a start."""
    saved = checkpoints.load() if checkpoints is not None else None
    if saved is None:
        return TrainState()
    run.model.load_state_dict(saved["model"])
    run.opt.load_state_dict(saved["optimizer"])
    run.sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    if run.device.type == "cuda" and "cuda_rng" in saved:
        torch.cuda.set_rng_state(saved["cuda_rng"], run.device)
    run.batches.load_state_dict(saved)
    return TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})


class LossSums:
    """The state's training-loss sums kept on the device between the moments the host reads them, in the same
    order of additions as on the host: (epoch loss, images, curve loss, images)."""

    def __init__(self, state: TrainState, device: torch.device):
        self.sums = torch.tensor([state.run_loss, state.seen, *state.curve_loss], dtype=torch.float64, device=device)

    def add(self, loss_sum: torch.Tensor) -> None:
        self.sums += loss_sum.repeat(2)

    def read(self, state: TrainState) -> None:
        loss, seen, curve_loss, curve_seen = self.sums.tolist()  # the one wait for the device
        state.run_loss, state.seen, state.curve_loss = loss, int(seen), (curve_loss, int(curve_seen))


def fit(
    model: TGM,
    train: Split,
    val: Split | None,
    params: TrainParams,
    objective: Objective,
    device: torch.device,
    *,
    dist: Dist | None = None,
    checkpoints: Checkpoints | None = None,
    curves: LiveCurves | None = None,
    pool: np.ndarray | None = None,
    restore_best: bool = True,
) -> tuple[list[dict], int]:
    """Train `model` in place for params.epochs epochs (or params.max_steps steps) and return the per-epoch
    history and the epoch whose weights it ends with: the best validation epoch's, or, without restore_best
    (a fixed budget that never looks at validation labels) or without `val`, the last step's.

    `pool` (classify): unlabelled images; each batch takes as many of them as it has labelled images, for the
    next-pixel loss only. `curves`: step-level training curves (dvclive), written while training."""
    dist = dist or Dist()
    run = Run(model, train, pool, params, objective=objective, device=device, dist=dist)
    if val is not None and resident(nbytes(val.tokens), device):
        val = val.on(device)
    state = resume(run, checkpoints)
    curves = curves if dist.is_main else None
    if curves is not None:
        curves.start(state.step)
    start, speeds = time.perf_counter(), []
    try:
        while state.epoch <= params.epochs and not state.stopped:
            t0, seen_at_start = time.perf_counter(), state.seen
            train_epoch(run, state, checkpoints, curves)
            epoch_time = time.perf_counter() - t0
            speeds.append((state.seen - seen_at_start) * run.batches.seq_len / epoch_time)  # logged only
            end_epoch(run, state, val, curves, epoch_time, speeds[-1])
            if checkpoints is not None:
                checkpoints.save(checkpoint_of(run, state))
    except BaseException:
        if checkpoints is not None:  # let a checkpoint being written finish; the first error is the one to see
            with contextlib.suppress(BaseException):
                checkpoints.wait()
        raise
    if checkpoints is not None:
        checkpoints.wait()
    if restore_best and state.best_state is not None:
        model.load_state_dict(state.best_state)
    if speeds:
        took = time.perf_counter() - start
        log.info("%s: %.1fs, %.0f tokens/s on average", objective.name, took, sum(speeds) / len(speeds))
    return state.history, state.best_epoch


def train_epoch(run: Run, state: TrainState, checkpoints: Checkpoints | None, curves: LiveCurves | None) -> None:
    """The rest of `state.epoch`'s batches, with a progress bar, the live curve and the periodic checkpoints."""
    from tqdm import tqdm

    run.model.train()
    order, steps = run.batches.epoch_order(state), len(run.batches)
    t0, seen_at_start = time.perf_counter(), state.seen
    desc = f"{run.objective.name} {state.epoch}/{run.params.epochs}"
    bar = tqdm(total=steps, initial=state.batch, desc=desc, unit="step", disable=None if run.dist.is_main else True,
               leave=False, dynamic_ncols=True)  # fmt: skip
    sums = LossSums(state, run.device)
    for b in range(state.batch, steps):
        sums.add(run.step(*run.batches.batch(order, b)))
        state.step, state.batch = state.step + 1, b + 1
        bar.update(1)
        # The host reads the losses only when something needs them: a curve point, the bar, a checkpoint.
        checkpoint = checkpoints is not None and checkpoints.due(state.step)
        point = state.step % LOG_EVERY == 0
        if checkpoint or (point and (curves is not None or not bar.disable)):
            sums.read(state)
            if point and curves is not None:
                curves.point(state)  # draws and clears state.curve_loss
            seq_len, elapsed = run.batches.seq_len, max(time.perf_counter() - t0, 1e-9)
            tok_s = (state.seen - seen_at_start) * seq_len / elapsed
            bar.set_postfix(loss=f"{state.run_loss / max(1, state.seen):.4f}", tok_s=f"{tok_s:.0f}")
            if checkpoint:
                checkpoints.save(checkpoint_of(run, state))
            sums = LossSums(state, run.device)
        if run.params.max_steps and state.step >= run.params.max_steps:
            state.stopped = True  # this epoch still ends (validation, history) as a shorter one
            break
    sums.read(state)
    bar.close()


def end_epoch(run: Run, state: TrainState, val: Split | None, curves, epoch_time: float, tokens_per_s: float) -> None:
    """Validate, record and log the epoch, update early stopping, then move `state` to the next epoch."""
    epoch, params, objective = state.epoch, run.params, run.objective
    row = {"epoch": epoch, "train_loss": state.run_loss / state.seen, "lr": run.sched.get_last_lr()[0]}
    if val is not None:
        scored = evaluate_split(run.model, val, objective, params.batch_size * 2, run.device, run.amp_dtype)
        row.update(val_loss=scored["loss"], val_bpp=scored["bpp"])
        if "accuracy" in scored:
            row.update(val_accuracy=scored["accuracy"], val_cls_loss=scored["cls_loss"])
    state.history.append(row)
    if curves is not None:
        curves.epoch(state, row)
    if run.dist.is_main and (val is not None or epoch == params.epochs):
        shown = f"val bpp {row['val_bpp']:.4f}" if "val_bpp" in row else ""
        shown = f"acc {row['val_accuracy']:.4f}" if "val_accuracy" in row else shown
        eta = epoch_time * (params.epochs - epoch)
        log.info("%s epoch %d/%d  train %.4f  %s  %.0f tok/s  eta %.0fs", objective.name, epoch, params.epochs,
                 row["train_loss"], shown, tokens_per_s, eta)  # fmt: skip
    watched = scored[objective.monitor] if val is not None else row["train_loss"]
    if not math.isfinite(watched):
        which = "validation" if val is not None else "training"
        raise TrainingDiverged(
            f"{objective.name}: {which} loss became {watched} in epoch {epoch}; training diverged, "
            "lower the learning rate"
        )
    if val is not None:
        if watched < state.best - 1e-6:
            state.best, state.best_epoch, state.bad_epochs = watched, epoch, 0
            state.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}  # on the device
        else:
            state.bad_epochs += 1
            if state.bad_epochs >= params.patience:
                log.info("%s: no validation improvement for %d epochs, stopping early", objective.name, params.patience)
                state.stopped = True
    state.epoch, state.batch, state.run_loss, state.seen = epoch + 1, 0, 0.0, 0
