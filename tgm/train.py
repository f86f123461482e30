"""One training loop for both objectives, and the `pretrain` / `finetune` stages built on it.

- generative (pretrain): next-pixel cross-entropy on the training images, labels unused.
- classify (finetune): cross-entropy on the class + lambda_gen * next-pixel cross-entropy (iGPT's joint loss).

AdamW (weight decay on matrices only), linear warmup then cosine decay, gradient clipping and accumulation,
bf16 autocast, optional torch.compile (of the blocks), early stopping on the validation split with the best
weights restored.
Under `torchrun --nproc_per_node=N` the same code trains with DistributedDataParallel (gloo on CPU, nccl on
GPU): `batch_size` is the global batch, each optimizer step splits it over ranks x grad_accum micro-batches,
so N processes follow the single-process run up to floating-point summation order.

Crash safety: every `checkpoint_every` optimizer steps and at each epoch end, rank 0 atomically writes the
whole training state (weights, optimizer, schedule, RNGs, data order, history). The same command started
again resumes from it and ends with the same numbers as an uninterrupted run.
Same params + same machine -> same numbers.

The loop keeps an accelerator busy with the same code that runs on the CPU: on a GPU the splits live on the
device when they fit (tgm.tokens.on_device), batches are gathered and augmented there, losses are summed there
and read by the host only when a curve point, a checkpoint or an epoch needs them, the best epoch's weights are
copied device to device, AdamW is fused, and checkpoints are written by a background thread from a snapshot.
On the CPU the tokens stream from disk a batch at a time (tgm.tokens.TokenFile).
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
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from tgm.errors import BaseMismatch, DeviceUnavailable, TrainingDiverged
from tgm.io import atomic_dir, atomic_file, write_json
from tgm.live import LOG_EVERY, LiveCurves
from tgm.model import TGM, TGMConfig, load_model, next_pixel_loss, save_model
from tgm.params import BaseParams, FinetuneParams, ModelParams, TrainParams
from tgm.tokens import TokenFile, TokenFiles, nbytes, on_device

log = logging.getLogger(__name__)
Objective = Literal["generative", "classify"]
LN2 = math.log(2.0)
CHECKPOINT_FILE = "checkpoint.pt"
RESIDENT_SHARE = 0.25  # a split is kept on the GPU when it takes at most this share of the free device memory


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
    # One fused kernel per step on CUDA; on the CPU the default (foreach) keeps the numbers runs have given.
    fused = all(p.is_cuda for p in decay + no_decay) or None
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": params.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=params.lr,
        betas=(0.9, 0.95),
        fused=fused,
    )


def lr_factor(step: int, total: int, warmup: int, min_fraction: float) -> float:
    """Linear warmup to 1, then cosine decay to min_fraction at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. A host tensor goes to a GPU through pinned memory, asynchronously: a plain `.to("cuda")`
    from pageable memory waits for every kernel already queued, which would stall the loop once per batch."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def shift_images(tokens: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each square image by up to max_shift pixels each way; uncovered pixels take the image's
    top-left pixel (the background on digits, scans and most photos of objects). The offsets are drawn from
    `generator` (a CPU one, so that every device draws the same); the images stay on their device."""
    B, T = tokens.shape
    S = math.isqrt(T)
    k = max_shift
    grid = tokens.view(B, S, S)
    fill = grid[:, :1, :1].expand(B, S + 2 * k, S + 2 * k).clone()
    fill[:, k : k + S, k : k + S] = grid
    offsets = to_device(torch.randint(0, 2 * k + 1, (B, 2), generator=generator), tokens.device)
    span = torch.arange(S, device=tokens.device)
    rows = (offsets[:, 0:1] + span)[:, :, None]  # (B, S, 1): each image's window into its padded copy
    cols = (offsets[:, 1:2] + span)[:, None, :]  # (B, 1, S)
    out = fill[torch.arange(B, device=tokens.device)[:, None, None], rows, cols]
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
    theta = to_device(theta, tokens.device)
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
    """Mean losses over a split; bits per pixel = next-pixel cross-entropy / ln 2. `tokens` and `labels` may be
    tensors already on the device (a resident split)."""
    model.eval()
    # Compiled blocks (compile: true) run eager here: compilation is for training, and validation's shapes
    # (no grad, a larger batch, the split's own last batch) would each compile again.
    with torch.compiler.set_stance("force_eager"):
        return _evaluate_split(model, tokens, labels, objective, lambda_gen, batch_size, device, amp_dtype)


def _evaluate_split(model, tokens, labels, objective, lambda_gen, batch_size, device, amp_dtype) -> dict:
    keys = ("gen_loss", "cls_loss", "correct")
    sums = torch.zeros(len(keys), dtype=torch.float64, device=device)  # read once, at the end
    n = len(tokens)
    for i in range(0, n, batch_size):
        x, y = _as_long(tokens[i : i + batch_size], device), None
        if labels is not None:
            y = _as_long(labels[i : i + batch_size], device)
        with autocast(device, amp_dtype):
            _, parts = batch_losses(model, x, y, objective, lambda_gen)
        for j, k in enumerate(keys):
            if k in parts:
                sums[j] += parts[k].double() * (1 if k == "correct" else len(x))
    sums = dict(zip(keys, sums.tolist()))
    out = {"gen_loss": sums["gen_loss"] / n, "bpp": sums["gen_loss"] / n / LN2}
    if objective == "classify":
        out.update(cls_loss=sums["cls_loss"] / n, accuracy=sums["correct"] / n)
        out["loss"] = out["cls_loss"] + lambda_gen * out["gen_loss"]
    else:
        out["loss"] = out["gen_loss"]
    return out


def _as_long(rows, device: torch.device) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.to(device).long()
    return to_device(torch.from_numpy(np.asarray(rows, dtype=np.int64)), device)


class Checkpointer:
    """One training-state file, replaced atomically; it is only resumed by a run with the same fingerprint
    (objective, device kind, params, model config, training data), so a changed experiment never picks up stale
    state, nor a CPU run a GPU's (its optimizer is the fused one, and its numbers are the GPU's)."""

    def __init__(self, directory: str | Path, fingerprint: str, every: int):
        self.directory, self.fingerprint, self.every = Path(directory), fingerprint, every
        self.path = self.directory / CHECKPOINT_FILE

    @staticmethod
    def fingerprint_of(*parts) -> str:
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


def _snapshot(obj):
    """A copy of a training state that later steps cannot change, on the host. A CUDA tensor is copied into
    pinned memory without waiting: the copy is queued behind the step that made it, before any later one."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            host = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
            return host.copy_(obj.detach(), non_blocking=True)
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj  # numbers, strings, None: immutable


class CheckpointWriter:
    """Writes each checkpoint from a snapshot in a background thread, one at a time, so that training goes
    on while the file is serialised and flushed to disk. An error in the thread is raised in the training
    thread at the next checkpoint or at `wait`."""

    def __init__(self, checkpointer: Checkpointer, device: torch.device):
        self.checkpointer, self.device = checkpointer, device
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, state: dict) -> None:
        self.wait()
        snapshot = _snapshot(state)
        copied = None
        if self.device.type == "cuda":  # on the training device's stream, which need not be the current device's
            copied = torch.cuda.current_stream(self.device).record_event()
        self.thread = threading.Thread(target=self._write, args=(snapshot, copied), name="tgm-checkpoint")
        self.thread.start()

    def _write(self, snapshot: dict, copied) -> None:
        try:
            if copied is not None:
                copied.synchronize()
            self.checkpointer.save(snapshot)
        except BaseException as e:  # noqa: BLE001 (handed to the training thread, which re-raises it)
            self.error = e

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _device_copy(module: torch.nn.Module) -> dict:
    """The module's weights, copied where they are: no trip to the host, no wait."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


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
    writer: CheckpointWriter | None  # writes the checkpointer's files in the background (main process only)
    curves: LiveCurves | None  # step-level curves (main process only)
    data_device: torch.device  # where tokens, labels and pool are: `device` when resident, else the CPU
    tokens: TokenFile | TokenFiles | np.ndarray | torch.Tensor  # read a batch at a time (tgm.tokens), or resident
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


def compile_blocks(model: TGM) -> None:
    """torch.compile each transformer block in place ("regional" compilation). The blocks share one graph,
    compiled once per input shape and reused by every layer, so compile time does not grow with depth; and
    `pretrain` and `finetune` run the same block graph, so the second stage finds it in inductor's on-disk
    cache (TORCHINDUCTOR_CACHE_DIR) instead of compiling again. Embedding, heads and losses stay eager."""
    for block in model.blocks:
        block.compile()


def _resident(need: int, device: torch.device) -> bool:
    """Whether data of `need` bytes is copied to the device once, rather than read a batch at a time: on a GPU,
    when it takes a small share of the memory free there. On the CPU it streams, which bounds the memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return need <= RESIDENT_SHARE * free


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
        compile_blocks(model)
    has_pool = unlabelled is not None and len(unlabelled) > 0
    need = nbytes(train[0]) + (nbytes(np.asarray(unlabelled)) if has_pool else 0)
    data_device = device if _resident(need, device) else torch.device("cpu")
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
        writer=CheckpointWriter(checkpointer, device) if checkpointer is not None and dist.is_main else None,
        curves=curves if dist.is_main else None,
        data_device=data_device,
        tokens=on_device(train[0], device) if data_device == device else train[0],
        labels=_as_long(train[1], data_device),
        pool=on_device(np.asarray(unlabelled), data_device) if has_pool else None,
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
    if run.writer is None:
        return
    state = {
        "model": run.model.state_dict(),
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
    run.writer.submit(state)


def _epoch_order(run: Run, progress: Progress) -> torch.Tensor:
    if progress.batch == 0:
        progress.epoch_order_rng = run.order_gen.get_state()
    else:  # resuming inside an epoch: replay the same shuffle
        run.order_gen.set_state(progress.epoch_order_rng)
    # Drawn on the CPU generator whatever the device, so that a resumed or moved run shuffles the same.
    return to_device(torch.randperm(len(run.tokens), generator=run.order_gen), run.data_device)


def _global_batch(run: Run, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `idx` with its share of unlabelled images, augmented, on the training device: the whole global
    batch, on every rank."""
    params = run.params
    xb = _as_long(run.tokens[idx] if run.data_device == run.device else run.tokens[idx.numpy()], run.device)
    yb = to_device(run.labels[idx], run.device)
    if run.pool is not None:  # interleaved, so that every micro-batch gets its share of both kinds
        draw = to_device(torch.randint(0, len(run.pool), (len(idx),), generator=run.pool_gen), run.data_device)
        extra = to_device(run.pool[draw], run.device).long()
        xb = torch.stack([xb, extra], dim=1).reshape(-1, xb.size(1))
        yb = torch.stack([yb, torch.full_like(yb, -1)], dim=1).reshape(-1)
    # Augmentation covers the whole global batch on every rank: the same draws as one process.
    if params.augment_rotate or params.augment_scale:
        xb = warp_images(xb, params.augment_rotate, params.augment_scale, run.aug_gen)
    if params.augment_shift:
        xb = shift_images(xb, params.augment_shift, run.aug_gen)
    return xb, yb


def _optimizer_step(run: Run, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """One optimizer step on this rank's micro-batches of the global batch; returns (summed loss, images) as a
    float64 tensor on the device, without waiting for it."""
    params, dist = run.params, run.dist
    # Every rank holds the whole global batch and takes its own consecutive micro-batches of it (views).
    parts = dist.world * params.grad_accum
    mine = slice(dist.rank * params.grad_accum, (dist.rank + 1) * params.grad_accum)
    micro = list(zip(xb.tensor_split(parts)[mine], yb.tensor_split(parts)[mine]))
    run.opt.zero_grad(set_to_none=True)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=run.device)
    for j, (x, y) in enumerate(micro):
        # A batch too small to give every rank a micro-batch still runs one (weighted 0) so that
        # all ranks take part in the gradient all-reduce.
        weight = len(x) / len(xb) * dist.world
        if len(x) == 0:
            x, y, weight = xb[:1], yb[:1], 0.0
        sync = run.ddp is None or j == len(micro) - 1
        with contextlib.nullcontext() if sync else run.ddp.no_sync(), autocast(run.device, run.amp_dtype):
            loss, _ = batch_losses(run.train_model, x, y, run.objective, run.lambda_gen)
        (loss * weight).backward()
        if weight:
            loss_sum[0] += loss.detach().double() * len(x)
            loss_sum[1] += len(x)
    if params.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), params.grad_clip)
    run.opt.step()
    run.sched.step()
    if dist.world > 1:
        torch.distributed.all_reduce(loss_sum)
    return loss_sum


class _Tally:
    """Progress's training-loss sums (run_loss, seen, curve_loss) kept on the device between the moments the
    host reads them: the same additions in the same order as on the host, with no wait per step."""

    def __init__(self, progress: Progress, device: torch.device, curves: bool):
        self.device, self.width = device, 4 if curves else 2  # without curves, curve_loss stays as it is
        self.load(progress)

    def load(self, progress: Progress) -> None:
        sums = [progress.run_loss, progress.seen, *progress.curve_loss][: self.width]
        self.sums = torch.tensor(sums, dtype=torch.float64, device=self.device)

    def add(self, loss_sum: torch.Tensor) -> None:
        self.sums += loss_sum.repeat(self.width // 2)

    def settle(self, progress: Progress) -> None:
        sums = self.sums.tolist()  # the one wait for the device
        progress.run_loss, progress.seen = sums[0], int(sums[1])
        if self.width == 4:
            progress.curve_loss = (sums[2], int(sums[3]))


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
    shown = not bar.disable
    tally = _Tally(progress, run.device, curves=run.curves is not None)
    for b in range(progress.batch, run.steps_per_epoch):
        tally.add(_optimizer_step(run, *_global_batch(run, order[b * batch : (b + 1) * batch])))
        progress.step += 1
        progress.batch = b + 1
        bar.update(1)
        # The host reads the losses only when something needs them: a curve point, the bar, a checkpoint.
        checkpoint = run.writer is not None and run.checkpointer.every and progress.step % run.checkpointer.every == 0
        point = progress.step % LOG_EVERY == 0
        if checkpoint or (point and (run.curves is not None or shown)):
            tally.settle(progress)
            if point and run.curves is not None:
                run.curves.point(progress)
            bar.set_postfix(
                loss=f"{progress.run_loss / max(1, progress.seen):.4f}",
                tok_s=f"{(progress.seen - seen_at_start) * seq_len / max(time.perf_counter() - t0, 1e-9):.0f}",
            )
            if checkpoint:
                _save_checkpoint(run, progress)
            tally.load(progress)
        if run.params.max_steps and progress.step >= run.params.max_steps:
            progress.stopped = True  # this epoch still ends (validation, history) as a shorter one
            break
    tally.settle(progress)
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
            progress.best_state = _device_copy(run.model)
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
    if val is not None and _resident(nbytes(val[0]), device):
        val = (on_device(val[0], device), _as_long(val[1], device))
    progress = _resume(run)
    if run.curves:
        run.curves.start(progress.step)
    start, speeds, seq_len = time.perf_counter(), [], train[0].shape[1]
    try:
        while progress.epoch <= params.epochs and not progress.stopped:
            t0, seen_at_start = time.perf_counter(), progress.seen
            _train_epoch(run, progress)
            epoch_time = time.perf_counter() - t0
            speeds.append((progress.seen - seen_at_start) * seq_len / epoch_time)  # logged only: timings vary
            _end_epoch(run, progress, val, epoch_time, speeds[-1])
            _save_checkpoint(run, progress)
    except BaseException:
        if run.writer is not None:  # let a checkpoint being written finish; the first error is the one to see
            with contextlib.suppress(BaseException):
                run.writer.wait()
        raise
    if run.writer is not None:
        run.writer.wait()
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

    meta = check_prepared(prepared_dir)
    return (
        meta,
        PreprocessSpec.load(prepared_dir),
        stream_split(prepared_dir, "train"),
        stream_split(prepared_dir, "val"),
    )


PROVENANCE_FILE = "provenance.json"


def start_from_base(base_dir: str | Path, model_params: ModelParams, spec, device: torch.device) -> TGM:
    """The base's weights, refused unless its architecture is model.*'s and its tokens are the task's."""
    base = load_model(base_dir, map_location=str(device), n_classes=0, strict=False)
    wanted = {**model_params.model_dump(), "palette_size": spec.palette_size, "seq_len": spec.seq_len}
    for key, value in wanted.items():
        if key != "dropout" and getattr(base.cfg, key) != value:
            where = f"model.{key}" if key in model_params.model_dump() else f"the prepared data's {key}"
            raise BaseMismatch(
                f"base {base_dir} has {key} {getattr(base.cfg, key)}, {where} is {value}: set it to the base's "
                "or leave base.path null"
            )
    base.cfg.dropout = model_params.dropout
    return base


def provenance(meta: dict, spec, tokens, epochs: int, base_dir: str | Path | None) -> dict:
    """What a pretrained model saw and where it started: its data (source, images, pools, the tokens' digest),
    its preprocessing, and the base it continued from, with that base's own provenance."""
    h = hashlib.sha256()
    for block in tokens.blocks():
        h.update(np.ascontiguousarray(block).tobytes())
    base = None
    if base_dir is not None:
        base_dir = Path(base_dir)
        earlier = base_dir / PROVENANCE_FILE
        base = {
            "path": str(base_dir),
            "weights_sha256": hashlib.sha256((base_dir / "model.safetensors").read_bytes()).hexdigest(),
            "provenance": json.loads(earlier.read_text()) if earlier.exists() else None,
        }
    return {
        "data": {
            "source": meta.get("source", ""),
            "images": len(tokens),
            "labelled_training_images": meta["split_sizes"]["train"],
            "pool_images": meta.get("pool_images", 0),
            "pools": meta.get("pools", {}),
            "tokens_sha256": h.hexdigest(),
        },
        "preprocess": {"image_size": spec.image_size, "palette_size": spec.palette_size, "color_mode": spec.color_mode},
        "epochs": epochs,
        "base": base,
    }


def pretrain(
    model_params: ModelParams,
    params: TrainParams,
    base: BaseParams | None = None,
    prepared_dir: str | Path = "data/prepared",
    out_dir: str | Path = "models/pretrained",
    metrics_path: str | Path = "metrics/pretrain.json",
    curve_path: str | Path = "plots/pretrain_curve.csv",
    checkpoint_dir: str | Path = "checkpoints/pretrain",
    live_dir: str | Path = "dvclive/pretrain",
) -> dict | None:
    """Next-pixel training on the training split and the unlabelled pool (labels unused), from a random start
    or from base.path. Returns the metrics on rank 0 (None on the other torchrun ranks, which write nothing)."""
    from tgm.prepare import stream_pool

    seed_everything(params.seed)
    dist, device = setup_distributed(params.device)
    meta, spec, train, val = _prepared(prepared_dir)
    pool = stream_pool(prepared_dir)
    # The pool joins the training images: generative training needs no labels, and never sees val or test.
    tokens = train[0] if pool is None else TokenFiles([train[0], pool])
    train = (tokens, np.zeros(len(tokens), np.int64))
    base_dir = base.path if base is not None else None
    if base_dir:
        model = start_from_base(base_dir, model_params, spec, device)
    else:
        cfg = TGMConfig(palette_size=spec.palette_size, seq_len=spec.seq_len, **model_params.model_dump())
        model = TGM(cfg).to(device)
    if dist.is_main:
        log.info(
            "pretrain: %.2fM parameters%s, %d training images (%d pooled) of %d pixels, device %s x %d process(es)",
            model.num_params() / 1e6,
            f" from base {base_dir}" if base_dir else "",
            len(tokens),
            0 if pool is None else len(pool),
            spec.seq_len,
            device,
            dist.world,
        )
    ckpt = Checkpointer(
        checkpoint_dir,
        Checkpointer.fingerprint_of(
            "generative", device.type, params.model_dump(), asdict(model.cfg), tokens, base_dir
        ),
        params.checkpoint_every,
    )
    if params.epochs:
        history, best_epoch = fit(
            model, train, val, params, "generative", device, checkpointer=ckpt, dist=dist, curves=LiveCurves(live_dir)
        )
    else:  # straight from the base: what it is worth on this task's validation images
        amp = resolve_precision(params.precision, device)
        scored = evaluate_split(model, *val, "generative", 0.0, params.batch_size * 2, device, amp)
        history, best_epoch = (
            [{"epoch": 0, "train_loss": None, "val_loss": scored["loss"], "val_bpp": scored["bpp"]}],
            0,
        )
        if dist.is_main:
            LiveCurves(live_dir).untrained(history[0])
    metrics = None
    if dist.is_main:
        best = history[best_epoch - 1] if best_epoch else history[0]
        with atomic_dir(out_dir) as tmp:
            save_model(model, tmp)
            spec.save(tmp)
            write_json(tmp / PROVENANCE_FILE, provenance(meta, spec, tokens, params.epochs, base_dir))
        # Timings stay out of the metrics: metrics must repeat exactly for the same params on the same machine.
        metrics = {
            "val_bpp": round(best["val_bpp"], 6),
            "best_epoch": best_epoch,
            "epochs_run": len(history) if params.epochs else 0,
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
    from tgm.prepare import load_pool

    seed_everything(params.seed)
    dist, device = setup_distributed(params.device)
    meta, spec, train, val = _prepared(prepared_dir)
    classes = meta["classes"]
    # Semi-supervised (finetune.unlabelled): the pool takes part in the next-pixel loss, never the class loss.
    pool = load_pool(prepared_dir) if params.unlabelled else None
    model = load_model(
        pretrained_dir, map_location=str(device), n_classes=len(classes), strict=False, cls_grid=params.cls_grid
    )
    # The pretrained weights are part of the fingerprint: a new pretrained model must not resume old state.
    weights = np.frombuffer((Path(pretrained_dir) / "model.safetensors").read_bytes(), dtype=np.uint8)
    ckpt = Checkpointer(
        checkpoint_dir,
        Checkpointer.fingerprint_of(
            "classify",
            device.type,
            params.model_dump(),
            asdict(model.cfg),
            train[0],
            train[1],
            weights,
            *([] if pool is None else [pool]),
        ),
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
        unlabelled=pool,
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
            pretrained = Path(pretrained_dir) / PROVENANCE_FILE
            if pretrained.exists():  # what the pretrained model it started from saw
                write_json(tmp / PROVENANCE_FILE, {"pretrained": json.loads(pretrained.read_text())})
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
