"""One training loop for both objectives, and the `pretrain` / `finetune` stages built on it.

- generative (pretrain): next-pixel cross-entropy on the training images, labels unused.
- classify (finetune): cross-entropy on the class + lambda_gen * next-pixel cross-entropy (iGPT's joint loss).

AdamW (weight decay on matrices only), linear warmup then cosine decay, gradient clipping and accumulation,
bf16 autocast, optional torch.compile, early stopping on the validation split with the best weights restored.
Under `torchrun --nproc_per_node=N` the same code trains with DistributedDataParallel (gloo on CPU, nccl on
GPU): `batch_size` is the global batch, each optimizer step splits it over ranks x grad_accum micro-batches,
so N processes follow the single-process run up to floating-point summation order.

Crash safety: every `checkpoint_every` optimizer steps and at each epoch end, rank 0 atomically writes the
whole training state (weights, optimizer, schedule, RNGs, data order, history). The same command started
again resumes from it and ends with the same numbers as an uninterrupted run.
Same params + same machine -> same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from tgm.errors import DeviceUnavailable, TrainingDiverged
from tgm.io import atomic_dir, atomic_file, write_json
from tgm.live import LiveCurves
from tgm.model import TGM, TGMConfig, load_model, next_pixel_loss, save_model
from tgm.params import FinetuneParams, ModelParams, TrainParams
from tgm.tokens import TokenFile

log = logging.getLogger(__name__)
Objective = Literal["generative", "classify"]
LN2 = math.log(2.0)
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a torchrun job; a plain run is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {name!r} was asked for, but PyTorch sees no CUDA device here")
    if name == "cuda":
        return torch.device("cuda", local_rank)  # one GPU per torchrun process
    return torch.device(name)


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name, dist.local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist, device


def teardown_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run ~3x faster than fp32 here; without them bf16 is emulated, slower."""
    # torch.cpu's probes are private; a torch without them is treated as a CPU without native bf16.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. auto: bf16 where the hardware does bf16 natively."""
    if precision == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
        return torch.bfloat16 if native else None
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def make_optimizer(model: torch.nn.Module, params: TrainParams) -> torch.optim.AdamW:
    # Decay matrices and embeddings; biases and LayerNorm gains are left alone.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": params.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=params.lr,
        betas=(0.9, 0.95),
    )


def lr_factor(step: int, total: int, warmup: int, min_fraction: float) -> float:
    """Linear warmup to 1, then cosine decay to min_fraction at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def shift_images(tokens: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each square image by up to max_shift pixels each way; uncovered pixels take the image's
    top-left pixel (the background on digits, scans and most photos of objects)."""
    B, T = tokens.shape
    S = math.isqrt(T)
    k = max_shift
    grid = tokens.view(B, S, S)
    fill = grid[:, :1, :1].expand(B, S + 2 * k, S + 2 * k).clone()
    fill[:, k : k + S, k : k + S] = grid
    offsets = torch.randint(0, 2 * k + 1, (B, 2), generator=generator)
    out = torch.stack([fill[b, dy : dy + S, dx : dx + S] for b, (dy, dx) in enumerate(offsets.tolist())])
    return out.reshape(B, T)


def warp_images(tokens: torch.Tensor, degrees: float, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each square image by up to +-degrees and zoom it by up to +-scale (a fraction), both drawn per
    image; nearest-neighbour sampling keeps palette indices whole, uncovered pixels take the top-left pixel."""
    B, T = tokens.shape
    S = math.isqrt(T)
    angle = (torch.rand(B, generator=generator) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(B, generator=generator) * 2 - 1) * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(B)], 1), torch.stack([sin, cos, torch.zeros(B)], 1)], 1)
    fill = tokens[:, :1].float().view(B, 1, 1, 1)
    grid = F.affine_grid(theta, (B, 1, S, S), align_corners=False)
    moved = (
        F.grid_sample(
            tokens.float().view(B, 1, S, S) - fill, grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
        + fill
    )
    return moved.round().to(tokens.dtype).view(B, T)


def batch_losses(
    model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor | None, objective: Objective, lambda_gen: float
) -> tuple[torch.Tensor, dict]:
    logits, class_logits = model(tokens)
    gen = next_pixel_loss(logits, tokens)
    if objective == "generative":
        return gen, {"gen_loss": gen.detach()}
    # Label -1 marks an unlabelled image (semi-supervised fine-tuning): it adds to the next-pixel loss only.
    per_image = F.cross_entropy(class_logits.float(), labels, ignore_index=-1, reduction="none")
    cls = per_image.sum() / (labels >= 0).sum().clamp(min=1)
    correct = (class_logits.argmax(-1) == labels).sum()
    return cls + lambda_gen * gen, {"gen_loss": gen.detach(), "cls_loss": cls.detach(), "correct": correct}


@torch.no_grad()
def evaluate_split(
    model: TGM,
    tokens: np.ndarray,
    labels: np.ndarray | None,
    objective: Objective,
    lambda_gen: float,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict:
    """Mean losses over a split; bits per pixel = next-pixel cross-entropy / ln 2."""
    model.eval()
    sums = {"gen_loss": 0.0, "cls_loss": 0.0, "correct": 0.0}
    n = len(tokens)
    for i in range(0, n, batch_size):
        x = torch.from_numpy(np.asarray(tokens[i : i + batch_size], dtype=np.int64)).to(device)
        y = torch.from_numpy(labels[i : i + batch_size]).to(device) if labels is not None else None
        with autocast(device, amp_dtype):
            _, parts = batch_losses(model, x, y, objective, lambda_gen)
        for k, v in parts.items():
            sums[k] += float(v) * (1 if k == "correct" else len(x))
    out = {"gen_loss": sums["gen_loss"] / n, "bpp": sums["gen_loss"] / n / LN2}
    if objective == "classify":
        out.update(cls_loss=sums["cls_loss"] / n, accuracy=sums["correct"] / n)
        out["loss"] = out["cls_loss"] + lambda_gen * out["gen_loss"]
    else:
        out["loss"] = out["gen_loss"]
    return out


class Checkpointer:
    """One training-state file, replaced atomically; it is only resumed by a run with the same fingerprint
    (objective, params, model config, training data), so a changed experiment never picks up stale state."""

    def __init__(self, directory: str | Path, fingerprint: str, every: int):
        self.directory, self.fingerprint, self.every = Path(directory), fingerprint, every
        self.path = self.directory / CHECKPOINT_FILE

    @staticmethod
    def fingerprint_of(*parts) -> str:
        h = hashlib.sha256()
        for part in parts:
            if isinstance(part, TokenFile):  # hashed as the int64 array it reads as, block by block
                for block in part.blocks():
                    h.update(block.astype(np.int64).tobytes())
            elif isinstance(part, np.ndarray):
                h.update(np.ascontiguousarray(part).tobytes())
            else:
                h.update(json.dumps(part, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            log.warning("%s belongs to other params or data; starting from scratch", self.path)
            return None
        return state

    def save(self, state: dict) -> None:
        with atomic_file(self.path, "wb", durable=True) as f:
            torch.save({**state, "fingerprint": self.fingerprint}, f)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


@dataclass
class Progress:
    """Where a run is and what it has learnt so far: everything a checkpoint restores besides weights,
    optimizer, schedule and random generators."""

    epoch: int = 1
    batch: int = 0  # batches of `epoch` done
    step: int = 0  # optimizer steps done
    run_loss: float = 0.0  # summed training loss of `epoch` so far ...
    seen: int = 0  # ... over this many images
    history: list[dict] = field(default_factory=list)
    best: float = math.inf  # best validation loss of the monitored objective
    best_epoch: int = 0
    best_state: dict | None = None
    bad_epochs: int = 0  # epochs since `best` last improved
    stopped: bool = False
    epoch_order_rng: torch.Tensor | None = None  # the order generator at the start of `epoch`
    curve_loss: tuple[float, int] = (0.0, 0)  # (summed loss, images) not yet drawn in the live curve

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # shallow: no copy of best_state


@dataclass
class Run:
    """The fixed parts of one `fit` call: data, model wrappers, optimizer, schedule and random generators."""

    model: TGM
    train_model: torch.nn.Module  # the model as trained: DDP- and/or compile-wrapped
    ddp: torch.nn.parallel.DistributedDataParallel | None
    params: TrainParams
    objective: Objective
    device: torch.device
    lambda_gen: float
    dist: Dist
    checkpointer: Checkpointer | None
    curves: LiveCurves | None  # step-level curves (main process only)
    tokens: TokenFile | np.ndarray  # read a batch at a time (tgm.tokens)
    labels: torch.Tensor
    pool: torch.Tensor | None  # unlabelled images mixed into each batch (classify only)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    amp_dtype: torch.dtype | None
    order_gen: torch.Generator  # the shuffle of each epoch
    aug_gen: torch.Generator  # augmentation draws
    pool_gen: torch.Generator  # which unlabelled images join a batch

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.tokens) / self.params.batch_size)

    @property
    def monitor(self) -> str:
        # Early stopping watches the validation loss of the objective being trained for.
        return "gen_loss" if self.objective == "generative" else "cls_loss"


def _start_run(model, train, params, objective, device, lambda_gen, checkpointer, dist, unlabelled, curves) -> Run:
    total = math.ceil(len(train[0]) / params.batch_size) * params.epochs
    warmup = max(1, int(total * params.warmup_fraction))
    opt = make_optimizer(model, params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, params.min_lr_fraction))
    ddp = None
    train_model: torch.nn.Module = model
    if dist.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        train_model = ddp
    if params.compile:
        train_model = torch.compile(train_model)
    return Run(
        model=model,
        train_model=train_model,
        ddp=ddp,
        params=params,
        objective=objective,
        device=device,
        lambda_gen=lambda_gen,
        dist=dist,
        checkpointer=checkpointer,
        curves=curves if dist.is_main else None,
        tokens=train[0],
        labels=torch.from_numpy(np.asarray(train[1], dtype=np.int64)),
        pool=torch.from_numpy(unlabelled) if unlabelled is not None and len(unlabelled) else None,
        opt=opt,
        sched=sched,
        amp_dtype=resolve_precision(params.precision, device),
        order_gen=torch.Generator().manual_seed(params.seed),
        aug_gen=torch.Generator().manual_seed(params.seed + 1),
        pool_gen=torch.Generator().manual_seed(params.seed + 2),
    )


def _resume(run: Run) -> Progress:
    """The progress of the run's last checkpoint, with weights, optimizer and generators restored; or a start."""
    saved = run.checkpointer.load() if run.checkpointer else None
    if saved is None:
        return Progress()
    run.model.load_state_dict(saved["model"])
    run.opt.load_state_dict(saved["optimizer"])
    run.sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    if run.device.type == "cuda" and "cuda_rng" in saved:
        torch.cuda.set_rng_state(saved["cuda_rng"], run.device)
    run.aug_gen.set_state(saved["aug_rng"])
    run.order_gen.set_state(saved["order_rng"])
    if "pool_rng" in saved:  # checkpoints written before the unlabelled pool existed
        run.pool_gen.set_state(saved["pool_rng"])
    progress = Progress(**{f.name: saved[f.name] for f in fields(Progress) if f.name in saved})
    log.info(
        "%s: resuming from %s at epoch %d, step %d", run.objective, run.checkpointer.path, progress.epoch, progress.step
    )
    return progress


def _save_checkpoint(run: Run, progress: Progress) -> None:
    if run.checkpointer is None or not run.dist.is_main:
        return
    state = {
        "model": _cpu_state(run.model),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "aug_rng": run.aug_gen.get_state(),
        "order_rng": run.order_gen.get_state(),
        "pool_rng": run.pool_gen.get_state(),
        **progress.as_dict(),
    }
    if run.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(run.device)
    run.checkpointer.save(state)


def _epoch_order(run: Run, progress: Progress) -> torch.Tensor:
    if progress.batch == 0:
        progress.epoch_order_rng = run.order_gen.get_state()
    else:  # resuming inside an epoch: replay the same shuffle
        run.order_gen.set_state(progress.epoch_order_rng)
    return torch.randperm(len(run.tokens), generator=run.order_gen)


def _global_batch(run: Run, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `idx` with its share of unlabelled images, augmented: the whole global batch, on every rank."""
    params = run.params
    xb = torch.from_numpy(np.asarray(run.tokens[idx.numpy()], dtype=np.int64))
    yb = run.labels[idx]
    if run.pool is not None:  # interleaved, so that every micro-batch gets its share of both kinds
        extra = run.pool[torch.randint(0, len(run.pool), (len(idx),), generator=run.pool_gen)]
        xb = torch.stack([xb, extra], dim=1).reshape(-1, xb.size(1))
        yb = torch.stack([yb, torch.full_like(yb, -1)], dim=1).reshape(-1)
    # Augmentation covers the whole global batch on every rank: the same draws as one process.
    if params.augment_rotate or params.augment_scale:
        xb = warp_images(xb, params.augment_rotate, params.augment_scale, run.aug_gen)
    if params.augment_shift:
        xb = shift_images(xb, params.augment_shift, run.aug_gen)
    return xb, yb


def _optimizer_step(run: Run, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """One optimizer step on this rank's micro-batches of the global batch; returns (summed loss, images)."""
    params, dist = run.params, run.dist
    # Every rank holds the whole global batch and takes its own micro-batches of it.
    micro = torch.tensor_split(torch.arange(len(xb)), dist.world * params.grad_accum)[
        dist.rank * params.grad_accum : (dist.rank + 1) * params.grad_accum
    ]
    run.opt.zero_grad(set_to_none=True)
    loss_sum = torch.zeros(2, dtype=torch.float64)
    for j, m in enumerate(micro):
        # A batch too small to give every rank a micro-batch still runs one (weighted 0) so that
        # all ranks take part in the gradient all-reduce.
        weight = len(m) / len(xb) * dist.world
        if len(m) == 0:
            m, weight = torch.arange(1), 0.0
        x, y = xb[m], yb[m]
        sync = run.ddp is None or j == len(micro) - 1
        with contextlib.nullcontext() if sync else run.ddp.no_sync(), autocast(run.device, run.amp_dtype):
            loss, _ = batch_losses(run.train_model, x.to(run.device), y.to(run.device), run.objective, run.lambda_gen)
        (loss * weight).backward()
        if weight:
            loss_sum += torch.tensor([loss.item() * len(m), len(m)], dtype=torch.float64)
    if params.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), params.grad_clip)
    run.opt.step()
    run.sched.step()
    if dist.world > 1:
        torch.distributed.all_reduce(loss_sum)
    return loss_sum


def _train_epoch(run: Run, progress: Progress) -> None:
    """The rest of `progress.epoch`'s batches, with a progress bar and the periodic checkpoints."""
    from tqdm import tqdm

    batch, seq_len = run.params.batch_size, run.tokens.shape[1]
    run.model.train()
    order = _epoch_order(run, progress)
    t0, seen_at_start = time.perf_counter(), progress.seen
    bar = tqdm(
        total=run.steps_per_epoch,
        initial=progress.batch,
        desc=f"{run.objective} {progress.epoch}/{run.params.epochs}",
        unit="step",
        disable=None if run.dist.is_main else True,
        leave=False,
        dynamic_ncols=True,
    )
    for b in range(progress.batch, run.steps_per_epoch):
        loss_sum = _optimizer_step(run, *_global_batch(run, order[b * batch : (b + 1) * batch]))
        progress.run_loss += float(loss_sum[0])
        progress.seen += int(loss_sum[1])
        progress.step += 1
        progress.batch = b + 1
        if run.curves:
            run.curves.step(progress, loss_sum)
        bar.update(1)
        bar.set_postfix(
            loss=f"{progress.run_loss / max(1, progress.seen):.4f}",
            tok_s=f"{(progress.seen - seen_at_start) * seq_len / max(time.perf_counter() - t0, 1e-9):.0f}",
        )
        if run.checkpointer and run.checkpointer.every and progress.step % run.checkpointer.every == 0:
            _save_checkpoint(run, progress)
        if run.params.max_steps and progress.step >= run.params.max_steps:
            progress.stopped = True  # this epoch still ends (validation, history) as a shorter one
            break
    bar.close()


def _end_epoch(run: Run, progress: Progress, val, epoch_time: float, tokens_per_s: float) -> None:
    """Validate, record and log the epoch, update early stopping, then move `progress` to the next epoch."""
    epoch, objective = progress.epoch, run.objective
    row = {"epoch": epoch, "train_loss": progress.run_loss / progress.seen, "lr": run.sched.get_last_lr()[0]}
    if val is not None:
        batch = run.params.batch_size * 2
        val_metrics = evaluate_split(run.model, *val, objective, run.lambda_gen, batch, run.device, run.amp_dtype)
        row.update(val_loss=val_metrics["loss"], val_bpp=val_metrics["bpp"])
        if objective == "classify":
            row.update(val_accuracy=val_metrics["accuracy"], val_cls_loss=val_metrics["cls_loss"])
    progress.history.append(row)
    if run.curves:
        run.curves.epoch(progress, row)
    if run.dist.is_main and (val is not None or epoch == run.params.epochs):
        _log_epoch(run, row, tokens_per_s, epoch_time * (run.params.epochs - epoch))
    watched = val_metrics[run.monitor] if val is not None else row["train_loss"]
    if not math.isfinite(watched):
        which = "validation" if val is not None else "training"
        raise TrainingDiverged(
            f"{objective}: {which} loss became {watched} in epoch {epoch}; training diverged, lower the learning rate"
        )
    if val is not None:
        if watched < progress.best - 1e-6:
            progress.best, progress.best_epoch, progress.bad_epochs = watched, epoch, 0
            progress.best_state = _cpu_state(run.model)
        else:
            progress.bad_epochs += 1
            if progress.bad_epochs >= run.params.patience:
                log.info("%s: no validation improvement for %d epochs, stopping early", objective, progress.bad_epochs)
                progress.stopped = True
    progress.epoch, progress.batch, progress.run_loss, progress.seen = epoch + 1, 0, 0.0, 0


def _log_epoch(run: Run, row: dict, tokens_per_s: float, eta_s: float) -> None:
    if "val_accuracy" in row:
        shown = f"acc {row['val_accuracy']:.4f}"
    else:
        shown = f"val bpp {row['val_bpp']:.4f}" if "val_bpp" in row else ""
    log.info(
        "%s epoch %d/%d  train %.4f  %s  %.0f tok/s  eta %.0fs",
        run.objective,
        row["epoch"],
        run.params.epochs,
        row["train_loss"],
        shown,
        tokens_per_s,
        eta_s,
    )


def fit(
    model: TGM,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    params: TrainParams,
    objective: Objective,
    device: torch.device,
    lambda_gen: float = 0.0,
    checkpointer: Checkpointer | None = None,
    dist: Dist = Dist(),
    restore_best: bool = True,
    unlabelled: np.ndarray | None = None,
    curves: LiveCurves | None = None,
) -> tuple[list[dict], int]:
    """Train in place; on return the model holds the weights of its best validation epoch (or, without
    restore_best, of its last step: a fixed budget that never looks at validation labels). Without `val`,
    training runs its epochs to the end and keeps the last weights.

    `unlabelled` (classify only): images without labels. Each step adds as many of them, drawn at random, as
    it has labelled images; they count in the next-pixel loss only (iGPT's joint loss over the unlabelled pool).

    `curves`: where to log step-level training curves while training (dvclive).

    Returns the per-epoch history and the number of the epoch whose weights were kept.
    """
    run = _start_run(model, train, params, objective, device, lambda_gen, checkpointer, dist, unlabelled, curves)
    progress = _resume(run)
    if run.curves:
        run.curves.start(progress.step)
    start, speeds, seq_len = time.perf_counter(), [], train[0].shape[1]
    while progress.epoch <= params.epochs and not progress.stopped:
        t0, seen_at_start = time.perf_counter(), progress.seen
        _train_epoch(run, progress)
        epoch_time = time.perf_counter() - t0
        speeds.append((progress.seen - seen_at_start) * seq_len / epoch_time)  # logged only: timings vary
        _end_epoch(run, progress, val, epoch_time, speeds[-1])
        _save_checkpoint(run, progress)
    if restore_best and progress.best_state is not None:
        model.load_state_dict(progress.best_state)
    if speeds:
        log.info(
            "%s: %.1fs, %.0f tokens/s on average", objective, time.perf_counter() - start, sum(speeds) / len(speeds)
        )
    return progress.history, progress.best_epoch


def write_curve(path: str | Path, history: list[dict]) -> None:
    import pandas as pd

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(history).round(6).to_csv(path, index=False)


def _prepared(prepared_dir: str | Path):
    from tgm.prepare import check_prepared, stream_split
    from tgm.preprocess import PreprocessSpec

    classes = check_prepared(prepared_dir)["classes"]
    return (
        classes,
        PreprocessSpec.load(prepared_dir),
        stream_split(prepared_dir, "train"),
        stream_split(prepared_dir, "val"),
    )


def pretrain(
    model_params: ModelParams,
    params: TrainParams,
    prepared_dir: str | Path = "data/prepared",
    out_dir: str | Path = "models/pretrained",
    metrics_path: str | Path = "metrics/pretrain.json",
    curve_path: str | Path = "plots/pretrain_curve.csv",
    checkpoint_dir: str | Path = "checkpoints/pretrain",
    live_dir: str | Path = "dvclive/pretrain",
) -> dict | None:
    """Returns the metrics on rank 0 (None on the other torchrun ranks, which write nothing)."""
    seed_everything(params.seed)
    dist, device = setup_distributed(params.device)
    _, spec, train, val = _prepared(prepared_dir)
    cfg = TGMConfig(palette_size=spec.palette_size, seq_len=spec.seq_len, **model_params.model_dump())
    model = TGM(cfg).to(device)
    if dist.is_main:
        log.info(
            "pretrain: %.2fM parameters, %d training images of %d pixels, device %s x %d process(es)",
            model.num_params() / 1e6,
            len(train[0]),
            spec.seq_len,
            device,
            dist.world,
        )
    ckpt = Checkpointer(
        checkpoint_dir,
        Checkpointer.fingerprint_of("generative", params.model_dump(), asdict(cfg), train[0]),
        params.checkpoint_every,
    )
    history, best_epoch = fit(
        model, train, val, params, "generative", device, checkpointer=ckpt, dist=dist, curves=LiveCurves(live_dir)
    )
    metrics = None
    if dist.is_main:
        best = history[best_epoch - 1]
        with atomic_dir(out_dir) as tmp:
            save_model(model, tmp)
            spec.save(tmp)
        # Timings stay out of the metrics: metrics must repeat exactly for the same params on the same machine.
        metrics = {
            "val_bpp": round(best["val_bpp"], 6),
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "parameters": model.num_params(),
        }
        write_curve(curve_path, history)
        write_json(metrics_path, metrics)
        ckpt.clear()
    teardown_distributed()
    return metrics


def finetune(
    params: FinetuneParams,
    prepared_dir: str | Path = "data/prepared",
    pretrained_dir: str | Path = "models/pretrained",
    out_dir: str | Path = "models/classifier",
    metrics_path: str | Path = "metrics/finetune.json",
    curve_path: str | Path = "plots/finetune_curve.csv",
    checkpoint_dir: str | Path = "checkpoints/finetune",
    live_dir: str | Path = "dvclive/finetune",
) -> dict | None:
    seed_everything(params.seed)
    dist, device = setup_distributed(params.device)
    classes, spec, train, val = _prepared(prepared_dir)
    model = load_model(
        pretrained_dir, map_location=str(device), n_classes=len(classes), strict=False, cls_grid=params.cls_grid
    )
    # The pretrained weights are part of the fingerprint: a new pretrained model must not resume old state.
    weights = np.frombuffer((Path(pretrained_dir) / "model.safetensors").read_bytes(), dtype=np.uint8)
    ckpt = Checkpointer(
        checkpoint_dir,
        Checkpointer.fingerprint_of("classify", params.model_dump(), asdict(model.cfg), train[0], train[1], weights),
        params.checkpoint_every,
    )
    history, best_epoch = fit(
        model,
        train,
        val,
        params,
        "classify",
        device,
        lambda_gen=params.lambda_gen,
        checkpointer=ckpt,
        dist=dist,
        curves=LiveCurves(live_dir),
    )
    metrics = None
    if dist.is_main:
        final = evaluate_split(
            model,
            *val,
            "classify",
            params.lambda_gen,
            params.batch_size * 2,
            device,
            resolve_precision(params.precision, device),
        )
        with atomic_dir(out_dir) as tmp:
            save_model(model, tmp, extra={"classes": classes})
            spec.save(tmp)
        metrics = {
            "val_accuracy": round(final["accuracy"], 6),
            "val_loss": round(final["cls_loss"], 6),
            "val_bpp": round(final["bpp"], 6),
            "epochs_run": len(history),
            "best_epoch": best_epoch,
        }
        write_curve(curve_path, history)
        write_json(metrics_path, metrics)
        ckpt.clear()
    teardown_distributed()
    return metrics
