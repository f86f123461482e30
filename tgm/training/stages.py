"""The `pretrain` and `finetune` stages: each builds its model and data, then `train_stage` runs it (setup, fit,
save, teardown).

- pretrain: next-pixel training on the training split and the unlabelled pool (labels unused), from a random
  start or from a base (base.path: another project's pretrained model, refused unless it fits); zero epochs
  keep the base as it is. Writes the model with its preprocessing and provenance.json (what it saw).
- finetune: the pretrained model as a classifier (joint loss); with finetune.unlabelled the pool joins the
  next-pixel loss.

Crash safety: every `checkpoint_every` optimizer steps and at each epoch end, rank 0 writes the whole training
state (tgm.training.checkpoint); the same command started again resumes from it and ends with the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tgm.errors import BaseMismatch
from tgm.io import atomic_dir, write_json
from tgm.live import LiveCurves
from tgm.model import TGM, TGMConfig, load_model, save_model
from tgm.params import BaseParams, FinetuneParams, ModelParams, TrainParams
from tgm.tokens import TokenFiles
from tgm.training.checkpoint import Checkpoints, fingerprint_of
from tgm.training.data import Split
from tgm.training.device import resolve_precision, seed_everything, setup_distributed, teardown_distributed
from tgm.training.loop import fit
from tgm.training.objectives import Classify, Generative, Objective, evaluate_split

log = logging.getLogger(__name__)
PROVENANCE_FILE = "provenance.json"


def write_curve(path: str | Path, history: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(history).round(6).to_csv(path, index=False)


def prepared(prepared_dir: str | Path) -> tuple[dict, object, Split, Split]:
    """meta.json (checked first), the preprocessing, and the train and validation splits, streamed from disk."""
    from tgm.prepare import check_prepared, stream_split
    from tgm.preprocess import PreprocessSpec

    meta = check_prepared(prepared_dir)
    splits = [Split(*stream_split(prepared_dir, name)) for name in ("train", "val")]
    return meta, PreprocessSpec.load(prepared_dir), *splits


def train_stage(
    params: TrainParams,
    objective: Objective,
    build: Callable[[torch.device], tuple[TGM, Split, Split, np.ndarray | None, list]],
    save: Callable[[TGM, list[dict], int, torch.device], dict],
    checkpoint_dir: str | Path,
    live_dir: str | Path,
) -> dict | None:
    """One training stage, the same for both: seed, join torchrun, `build` the model and data on the device
    (with the fingerprint parts of what is trained), fit with checkpoints in `checkpoint_dir` and live curves
    in `live_dir`, then `save` the outputs on rank 0. Returns its metrics (None on the other ranks)."""
    seed_everything(params.seed)
    dist, device = setup_distributed(params.device)
    failed = True
    try:
        model, train, val, pool, identity = build(device)
        if dist.is_main:
            log.info(
                "%s: %.2fM parameters, %d training images of %d pixels, device %s x %d process(es)",
                objective.name, model.num_params() / 1e6, len(train), train.seq_len, device, dist.world,
            )  # fmt: skip
        fingerprint = fingerprint_of(objective.name, device.type, params.model_dump(), asdict(model.cfg), *identity)
        checkpoints = Checkpoints(checkpoint_dir, fingerprint, params.checkpoint_every, device, dist.is_main)
        history, best_epoch = [], 0
        if params.epochs:
            curves = LiveCurves(live_dir)
            history, best_epoch = fit(
                model, train, val, params, objective, device, dist=dist, checkpoints=checkpoints, curves=curves,
                pool=pool,
            )  # fmt: skip
        metrics = save(model, history, best_epoch, device) if dist.is_main else None
        if dist.is_main:
            checkpoints.clear()
        failed = False
        return metrics
    finally:
        teardown_distributed(barrier=not failed)  # a failed rank must not wait for the others


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
    params: TrainParams,
    *,
    model: ModelParams,
    base: BaseParams,
    prepared_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    curve_path: str | Path,
    live_dir: str | Path,
    checkpoint_dir: str | Path,
) -> dict | None:
    from tgm.prepare import stream_pool

    model_params = model
    meta, spec, train, val = prepared(prepared_dir)
    pool = stream_pool(prepared_dir)
    # The pool joins the training images: generative training needs no labels, and never sees val or test.
    tokens = train.tokens if pool is None else TokenFiles([train.tokens, pool])
    train = Split(tokens, np.zeros(len(tokens), np.int64))
    if pool is not None or base.path:
        log.info(
            "pretrain: %d pooled images beside the training split, base %s", 0 if pool is None else len(pool), base.path
        )

    def build(device):
        if base.path:
            model = start_from_base(base.path, model_params, spec, device)
        else:
            model = TGM(TGMConfig(palette_size=spec.palette_size, seq_len=spec.seq_len, **model_params.model_dump()))
        return model.to(device), train, val, None, [tokens, base.path]

    def save(model, history, best_epoch, device):
        if not history:  # zero epochs: the base as it is, scored on this task's validation images
            scored = evaluate_split(model, val, Generative(), params.batch_size * 2, device,
                                    resolve_precision(params.precision, device))  # fmt: skip
            history = [{"epoch": 0, "train_loss": None, "val_loss": scored["loss"], "val_bpp": scored["bpp"]}]
            LiveCurves(live_dir).untrained(history[0])
        with atomic_dir(out_dir) as tmp:
            save_model(model, tmp)
            spec.save(tmp)
            write_json(tmp / PROVENANCE_FILE, provenance(meta, spec, tokens, params.epochs, base.path))
        # Timings stay out of the metrics: metrics must repeat exactly for the same params on the same machine.
        metrics = {
            "val_bpp": round(history[max(best_epoch, 1) - 1]["val_bpp"], 6),
            "best_epoch": best_epoch,
            "epochs_run": len(history) if params.epochs else 0,
            "parameters": model.num_params(),
        }
        write_curve(curve_path, history)
        write_json(metrics_path, metrics)
        return metrics

    return train_stage(params, Generative(), build, save, checkpoint_dir, live_dir)


def finetune(
    params: FinetuneParams,
    *,
    prepared_dir: str | Path,
    pretrained_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    curve_path: str | Path,
    live_dir: str | Path,
    checkpoint_dir: str | Path,
) -> dict | None:
    from tgm.prepare import load_pool

    meta, spec, train, val = prepared(prepared_dir)
    classes, objective = meta["classes"], Classify(params.lambda_gen)
    # Semi-supervised (finetune.unlabelled): the pool takes part in the next-pixel loss, never the class loss.
    pool = load_pool(prepared_dir) if params.unlabelled else None

    def build(device):
        model = load_model(pretrained_dir, str(device), n_classes=len(classes), strict=False, cls_grid=params.cls_grid)
        # The pretrained weights are part of the fingerprint: a new pretrained model must not resume old state.
        weights = np.frombuffer((Path(pretrained_dir) / "model.safetensors").read_bytes(), dtype=np.uint8)
        return model, train, val, pool, [train.tokens, train.labels, weights, *([] if pool is None else [pool])]

    def save(model, history, best_epoch, device):
        amp = resolve_precision(params.precision, device)
        final = evaluate_split(model, val, objective, params.batch_size * 2, device, amp)
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
        return metrics

    return train_stage(params, objective, build, save, checkpoint_dir, live_dir)
