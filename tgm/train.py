"""One training loop for both objectives, and the `pretrain` / `finetune` stages built on it.

- generative (pretrain): next-pixel cross-entropy on the training images, labels unused.
- classify (finetune): cross-entropy on the class + lambda_gen * next-pixel cross-entropy (iGPT's joint loss).

AdamW (weight decay on matrices only), linear warmup then cosine decay, gradient clipping, early stopping
on the validation split with the best weights restored. Same params + same machine -> same numbers.
"""
from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from tgm.io import atomic_dir, write_json
from tgm.model import TGM, TGMConfig, load_model, save_model
from tgm.params import FinetuneParams, ModelParams, TrainParams
from tgm.prepare import check_prepared, load_split
from tgm.preprocess import PreprocessSpec

log = logging.getLogger(__name__)
Objective = Literal["generative", "classify"]
LN2 = math.log(2.0)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but PyTorch sees no CUDA device here")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def make_optimizer(model: torch.nn.Module, params: TrainParams) -> torch.optim.AdamW:
    # Decay matrices and embeddings; biases and LayerNorm gains are left alone.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": params.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=params.lr, betas=(0.9, 0.95))


def lr_factor(step: int, total: int, warmup: int, min_fraction: float) -> float:
    """Linear warmup to 1, then cosine decay to min_fraction at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_losses(model: TGM, tokens: torch.Tensor, labels: torch.Tensor | None, objective: Objective,
                 lambda_gen: float) -> tuple[torch.Tensor, dict]:
    logits, class_logits = model(tokens)
    gen = model.generative_loss(logits, tokens)
    if objective == "generative":
        return gen, {"gen_loss": gen.detach()}
    cls = F.cross_entropy(class_logits.float(), labels)
    correct = (class_logits.argmax(-1) == labels).sum()
    return cls + lambda_gen * gen, {"gen_loss": gen.detach(), "cls_loss": cls.detach(), "correct": correct}


@torch.no_grad()
def evaluate_split(model: TGM, tokens: np.ndarray, labels: np.ndarray | None, objective: Objective,
                   lambda_gen: float, batch_size: int, device: torch.device) -> dict:
    """Mean losses over a split; bits per pixel = next-pixel cross-entropy / ln 2."""
    model.eval()
    sums = {"gen_loss": 0.0, "cls_loss": 0.0, "correct": 0.0}
    n = len(tokens)
    for i in range(0, n, batch_size):
        x = torch.from_numpy(tokens[i:i + batch_size]).to(device)
        y = torch.from_numpy(labels[i:i + batch_size]).to(device) if labels is not None else None
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


def fit(model: TGM, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
        params: TrainParams, objective: Objective, device: torch.device,
        lambda_gen: float = 0.0) -> tuple[list[dict], int]:
    """Train in place; on return the model holds the weights of its best validation epoch.

    Returns the per-epoch history and the number of the epoch whose weights were kept.
    """
    tokens, labels = train
    n = len(tokens)
    steps_per_epoch = math.ceil(n / params.batch_size)
    total = steps_per_epoch * params.epochs
    warmup = max(1, int(total * params.warmup_fraction))
    opt = make_optimizer(model, params)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, params.min_lr_fraction))
    gen = torch.Generator().manual_seed(params.seed)
    # Early stopping watches the validation loss of the objective being trained for.
    monitor = "gen_loss" if objective == "generative" else "cls_loss"
    best, best_state, best_epoch, bad_epochs, history, speeds = math.inf, None, 0, 0, [], []
    tokens_t = torch.from_numpy(tokens)
    labels_t = torch.from_numpy(labels)
    start = time.perf_counter()
    for epoch in range(1, params.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=gen)
        run_loss, seen, t0 = 0.0, 0, time.perf_counter()
        for i in range(0, n, params.batch_size):
            idx = order[i:i + params.batch_size]
            x, y = tokens_t[idx].to(device), labels_t[idx].to(device)
            loss, _ = batch_losses(model, x, y, objective, lambda_gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if params.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            opt.step()
            sched.step()
            run_loss += loss.item() * len(idx)
            seen += len(idx)
        epoch_time = time.perf_counter() - t0
        val_metrics = evaluate_split(model, *val, objective, lambda_gen, params.batch_size * 2, device)
        row = {"epoch": epoch, "train_loss": run_loss / seen, "val_loss": val_metrics["loss"],
               "val_bpp": val_metrics["bpp"], "lr": sched.get_last_lr()[0]}
        if objective == "classify":
            row["val_accuracy"] = val_metrics["accuracy"]
            row["val_cls_loss"] = val_metrics["cls_loss"]
        history.append(row)
        tokens_per_s = seen * tokens.shape[1] / epoch_time  # logged only: timings would make outputs vary
        speeds.append(tokens_per_s)
        eta = (time.perf_counter() - start) / epoch * (params.epochs - epoch)
        log.info("%s epoch %d/%d  train %.4f  val %.4f  %s  %.0f tok/s  eta %.0fs", objective, epoch, params.epochs,
                 row["train_loss"], row["val_loss"],
                 f"acc {row['val_accuracy']:.4f}" if objective == "classify" else f"bpp {row['val_bpp']:.4f}",
                 tokens_per_s, eta)
        if not math.isfinite(val_metrics[monitor]):
            raise FloatingPointError(f"{objective}: validation loss became {val_metrics[monitor]} in epoch {epoch}; "
                                     "training diverged, lower the learning rate")
        if val_metrics[monitor] < best - 1e-6:
            best, best_epoch, bad_epochs = val_metrics[monitor], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
            if bad_epochs >= params.patience:
                log.info("%s: no validation improvement for %d epochs, stopping early", objective, bad_epochs)
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    log.info("%s: %.1fs, %.0f tokens/s on average", objective, time.perf_counter() - start, sum(speeds) / len(speeds))
    return history, best_epoch


def write_curve(path: str | Path, history: list[dict]) -> None:
    import pandas as pd

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(history).round(6).to_csv(path, index=False)


def pretrain(model_params: ModelParams, params: TrainParams, prepared_dir: str | Path = "data/prepared",
             out_dir: str | Path = "models/pretrained", metrics_path: str | Path = "metrics/pretrain.json",
             curve_path: str | Path = "plots/pretrain_curve.csv") -> dict:
    seed_everything(params.seed)
    device = resolve_device(params.device)
    check_prepared(prepared_dir)
    spec = PreprocessSpec.load(prepared_dir)
    train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    cfg = TGMConfig(palette_size=spec.palette_size, seq_len=spec.seq_len, **asdict(model_params))
    model = TGM(cfg).to(device)
    log.info("pretrain: %.2fM parameters, %d training images of %d pixels, device %s",
             model.num_params() / 1e6, len(train[0]), spec.seq_len, device)
    history, best_epoch = fit(model, train, val, params, "generative", device)
    best = history[best_epoch - 1]
    with atomic_dir(out_dir) as tmp:
        save_model(model, tmp)
        spec.save(tmp)
    # Timings stay out of the metrics: metrics must repeat exactly for the same params on the same machine.
    metrics = {"val_bpp": round(best["val_bpp"], 6), "best_epoch": best_epoch, "epochs_run": len(history),
               "parameters": model.num_params()}
    write_curve(curve_path, history)
    write_json(metrics_path, metrics)
    return metrics


def finetune(params: FinetuneParams, prepared_dir: str | Path = "data/prepared",
             pretrained_dir: str | Path = "models/pretrained", out_dir: str | Path = "models/classifier",
             metrics_path: str | Path = "metrics/finetune.json",
             curve_path: str | Path = "plots/finetune_curve.csv") -> dict:
    seed_everything(params.seed)
    device = resolve_device(params.device)
    classes = check_prepared(prepared_dir)["classes"]
    spec = PreprocessSpec.load(prepared_dir)
    train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    model = load_model(pretrained_dir, map_location=str(device), n_classes=len(classes), strict=False)
    history, best_epoch = fit(model, train, val, params, "classify", device, lambda_gen=params.lambda_gen)
    final = evaluate_split(model, *val, "classify", params.lambda_gen, params.batch_size * 2, device)
    with atomic_dir(out_dir) as tmp:
        save_model(model, tmp, extra={"classes": classes})
        spec.save(tmp)
    metrics = {"val_accuracy": round(final["accuracy"], 6), "val_loss": round(final["cls_loss"], 6),
               "val_bpp": round(final["bpp"], 6), "epochs_run": len(history), "best_epoch": best_epoch}
    write_curve(curve_path, history)
    write_json(metrics_path, metrics)
    return metrics
