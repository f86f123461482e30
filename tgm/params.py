"""Typed view of `params.yaml`, checked once when it is read.

Every stage reads its group through `load_params`. A wrong type, an unknown key or an out-of-range value
raises `ParamsError` naming the dotted key, so a typo in `dvc exp run -S` fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ParamsError(ValueError):
    """A value in params.yaml is missing, of the wrong type, or out of range."""


@dataclass(frozen=True)
class IngestParams:
    # builtin:mnist5k | builtin:digits | folder:PATH (one sub-folder per class)
    source: str = "builtin:mnist5k"

    def check(self) -> None:
        kind, _, arg = self.source.partition(":")
        if kind == "builtin":
            if arg not in ("mnist5k", "digits"):
                raise ParamsError(f"ingest.source: unknown built-in dataset {arg!r} (use mnist5k or digits)")
        elif kind == "folder":
            if not arg:
                raise ParamsError("ingest.source: 'folder:' needs a path, e.g. folder:data/sources/pets")
        else:
            raise ParamsError(f"ingest.source: {self.source!r} is not builtin:mnist5k, builtin:digits or folder:PATH")


@dataclass(frozen=True)
class ValidateParams:
    min_images_per_class: int = 5
    max_reject_fraction: float = 0.2
    min_side: int = 4  # pixels; smaller images cannot be resized into anything meaningful
    max_pixels: int = 89_478_485  # decompression-bomb limit (Pillow's default warning threshold)
    max_aspect: float = 10.0  # longest side / shortest side
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
    near_constant_std: float = 2.0  # grey-level std below which an image is flagged as (nearly) blank
    max_class_imbalance: float = 10.0  # largest class / smallest class, reported when exceeded

    def check(self) -> None:
        _at_least("validate.min_images_per_class", self.min_images_per_class, 1)
        _fraction("validate.max_reject_fraction", self.max_reject_fraction)
        _at_least("validate.min_side", self.min_side, 1)
        _at_least("validate.max_pixels", self.max_pixels, 1)
        _at_least("validate.max_aspect", self.max_aspect, 1)
        if not self.allowed_formats:
            raise ParamsError("validate.allowed_formats: needs at least one format")
        _at_least("validate.near_constant_std", self.near_constant_std, 0)
        _at_least("validate.max_class_imbalance", self.max_class_imbalance, 1)


@dataclass(frozen=True)
class PrepareParams:
    image_size: int = 14
    palette_size: int = 16
    color_mode: Literal["auto", "grey", "rgb"] = "auto"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    kmeans_sample_pixels: int = 200_000

    def check(self) -> None:
        _at_least("prepare.image_size", self.image_size, 2)
        _at_least("prepare.palette_size", self.palette_size, 2)
        if self.palette_size > 4096:
            raise ParamsError(f"prepare.palette_size: {self.palette_size} is more than 4096 colours")
        _fraction("prepare.val_fraction", self.val_fraction, open_low=True)
        _fraction("prepare.test_fraction", self.test_fraction, open_low=True)
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ParamsError("prepare.val_fraction + prepare.test_fraction must leave at least 10% for training")
        _at_least("prepare.kmeans_sample_pixels", self.kmeans_sample_pixels, 1000)


@dataclass(frozen=True)
class ModelParams:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def check(self) -> None:
        _at_least("model.n_layer", self.n_layer, 1)
        _at_least("model.n_head", self.n_head, 1)
        _at_least("model.n_embd", self.n_embd, 8)
        if self.n_embd % self.n_head:
            raise ParamsError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        _fraction("model.dropout", self.dropout, open_high=True)


@dataclass(frozen=True)
class TrainParams:
    """Optimisation settings shared by pretraining and fine-tuning (one training loop serves both)."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    patience: int = 3  # epochs without validation improvement before stopping early
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    grad_accum: int = 1  # micro-batches per optimizer step; batch_size stays the global batch
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a CUDA device, else fp32
    compile: bool = False  # torch.compile the model for training (pays off on CUDA; slow to start on CPU)
    checkpoint_every: int = 50  # optimizer steps between crash-safe checkpoints; 0 turns them off
    augment_shift: int = 0  # shift training images by up to this many pixels (fill: the image's corner)
    augment_rotate: float = 0.0  # rotate training images by up to this many degrees either way
    augment_scale: float = 0.0  # zoom training images in or out by up to this fraction

    def check(self, group: str) -> None:
        _at_least(f"{group}.epochs", self.epochs, 1)
        _at_least(f"{group}.batch_size", self.batch_size, 1)
        if not 0 < self.lr < 1:
            raise ParamsError(f"{group}.lr: {self.lr} is not in (0, 1)")
        _at_least(f"{group}.weight_decay", self.weight_decay, 0)
        _fraction(f"{group}.warmup_fraction", self.warmup_fraction, open_high=True)
        _fraction(f"{group}.min_lr_fraction", self.min_lr_fraction)
        _at_least(f"{group}.grad_clip", self.grad_clip, 0)
        _at_least(f"{group}.patience", self.patience, 1)
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ParamsError(f"{group}.device: {self.device!r} is not auto, cpu, cuda or cuda:N")
        _at_least(f"{group}.grad_accum", self.grad_accum, 1)
        if self.batch_size < self.grad_accum:
            raise ParamsError(
                f"{group}.grad_accum: {self.grad_accum} micro-batches cannot split a batch of {self.batch_size}"
            )
        _at_least(f"{group}.checkpoint_every", self.checkpoint_every, 0)
        _at_least(f"{group}.augment_shift", self.augment_shift, 0)
        if not 0 <= self.augment_rotate <= 180:
            raise ParamsError(f"{group}.augment_rotate: {self.augment_rotate} is not in [0, 180] degrees")
        if not 0 <= self.augment_scale < 1:
            raise ParamsError(f"{group}.augment_scale: {self.augment_scale} is not in [0, 1)")


@dataclass(frozen=True)
class FinetuneParams(TrainParams):
    lambda_gen: float = 0.5  # weight of the next-pixel loss next to the class loss (iGPT: joint loss)
    cls_grid: int = 1  # the head averages features over cls_grid x cls_grid image regions (1: iGPT's average)

    def check(self, group: str = "finetune") -> None:
        super().check(group)
        _at_least(f"{group}.lambda_gen", self.lambda_gen, 0)
        _at_least(f"{group}.cls_grid", self.cls_grid, 1)


@dataclass(frozen=True)
class ProbeParams:
    """Linear probes on the pretrained model: logistic regression on each layer's average-pooled features."""

    C: float = 1.0  # inverse L2 strength of the logistic regression
    max_iter: int = 2000

    def check(self) -> None:
        if not self.C > 0:
            raise ParamsError(f"probe.C: {self.C} must be > 0")
        _at_least("probe.max_iter", self.max_iter, 10)


@dataclass(frozen=True)
class StudyParams:
    """Label-efficiency study (protocol in tgm/study.py and the README): every arm on the same labelled
    subsets, each selecting its settings on a held-out part of its subset only."""

    fractions: tuple[float, ...] = (0.01, 0.1)  # shares of the training labels (stratified, seeded)
    subsets: int = 3  # label subsets per share (seeds seed, seed+1, ...): mean and spread are reported
    folds: int = 1  # model selection inside each subset: 1 = one holdout, k >= 2 = stratified k-fold
    holdout: float = 0.25  # with folds 1: share of each subset held out for selection (at least one per class)
    steps: int = 80  # optimizer steps of the pretrained fine-tune's selection run on each fit part
    scratch_steps: int = 120  # ... and of the from-scratch arm's, which starts from nothing
    unlabelled: bool = False  # neural arms add the next-pixel loss on the unlabelled training images
    finetune_lrs: tuple[float, ...] = (0.001,)  # learning rates the pretrained fine-tune chooses from
    scratch_lrs: tuple[float, ...] = (0.005,)  # learning rates the from-scratch arm chooses from
    probe_C: tuple[float, ...] = (0.01, 0.1, 1.0)  # the probe's C grid (each layer and all layers)
    logreg_C: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)
    svm_C: tuple[float, ...] = (1.0, 10.0, 100.0)
    svm_gamma_scale: tuple[float, ...] = (0.3, 1.0, 3.0)  # multiples of scikit-learn's gamma='scale'
    knn_k: tuple[int, ...] = (1, 3, 5, 9)
    seed: int = 0

    def check(self) -> None:
        if not self.fractions:
            raise ParamsError("study.fractions: needs at least one fraction")
        for f in self.fractions:
            if not 0 < f <= 1:
                raise ParamsError(f"study.fractions: {f} is not in (0, 1]")
        _at_least("study.subsets", self.subsets, 1)
        _at_least("study.folds", self.folds, 1)
        _fraction("study.holdout", self.holdout, open_low=True, open_high=True)
        _at_least("study.steps", self.steps, 1)
        _at_least("study.scratch_steps", self.scratch_steps, 1)
        for key in ("finetune_lrs", "scratch_lrs"):
            values = getattr(self, key)
            if not values or not all(0 < v < 1 for v in values):
                raise ParamsError(f"study.{key}: needs one or more learning rates in (0, 1), got {list(values)}")
        for key in ("probe_C", "logreg_C", "svm_C", "svm_gamma_scale", "knn_k"):
            values = getattr(self, key)
            if not values or not all(v > 0 for v in values):
                raise ParamsError(f"study.{key}: needs one or more values > 0, got {list(values)}")


@dataclass(frozen=True)
class EvaluateParams:
    completion_images: int = 8
    completion_samples: int = 4
    temperature: float = 1.0
    top_k: int = 0  # 0 samples from the whole palette
    seed: int = 0
    svm_reference: bool = True  # fit an RBF SVM on the same split, as a yardstick

    def check(self) -> None:
        _at_least("evaluate.completion_images", self.completion_images, 1)
        _at_least("evaluate.completion_samples", self.completion_samples, 1)
        if not self.temperature > 0:
            raise ParamsError(f"evaluate.temperature: {self.temperature} must be > 0")
        _at_least("evaluate.top_k", self.top_k, 0)


@dataclass(frozen=True)
class GateParams:
    min_accuracy: float = 0.9
    min_macro_f1: float = 0.9
    max_regression: float | None = 0.01  # None: no comparison with the champion

    def check(self) -> None:
        _fraction("gate.min_accuracy", self.min_accuracy)
        _fraction("gate.min_macro_f1", self.min_macro_f1)
        if self.max_regression is not None:
            _fraction("gate.max_regression", self.max_regression)


@dataclass(frozen=True)
class PackageParams:
    model_name: str = "tgm-classifier"
    build_bento: bool = True

    def check(self) -> None:
        if not self.model_name or not all(c.isalnum() or c in "-_." for c in self.model_name):
            raise ParamsError(f"package.model_name: {self.model_name!r} is not a valid BentoML model name")


@dataclass(frozen=True)
class Params:
    ingest: IngestParams = field(default_factory=IngestParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    model: ModelParams = field(default_factory=ModelParams)
    pretrain: TrainParams = field(default_factory=TrainParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    probe: ProbeParams = field(default_factory=ProbeParams)
    study: StudyParams = field(default_factory=StudyParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    gate: GateParams = field(default_factory=GateParams)
    package: PackageParams = field(default_factory=PackageParams)

    def check(self) -> None:
        for f in dataclasses.fields(self):
            group = getattr(self, f.name)
            if isinstance(group, TrainParams):
                group.check(f.name)
            else:
                group.check()


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and check params.yaml; missing groups or keys take their defaults."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such file (run from the project root, or pass --params)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    params = parse_params(raw)
    params.check()
    return params


def parse_params(raw: Any) -> Params:
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml: the top level must be a mapping of stage groups")
    return _build(Params, raw, prefix="")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamsError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ParamsError(f"{key}: expected a mapping of parameters, got {value!r}")
            values[name] = _build(hint, value, prefix=f"{key}.")
        else:
            values[name] = _coerce(key, hint, value)
    return cls(**values)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if item is int:
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ParamsError(f"{key}: expected a list of integers, got {value!r}")
            return tuple(value)
        if item is float:
            if not isinstance(value, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
            ):
                raise ParamsError(f"{key}: expected a list of numbers, got {value!r}")
            return tuple(float(v) for v in value)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ParamsError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and len(args) == 2:
            if value is None:
                return None
            return _coerce(key, next(a for a in args if a is not type(None)), value)
        raise TypeError(f"params: no rule for {key} of type {hint}")
    raise TypeError(f"params: no rule for {key} of type {hint}")  # a programming error, not a user one


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ParamsError(f"{key}: {value} is below the minimum {low}")


def _fraction(key: str, value: float, open_low: bool = False, open_high: bool = False) -> None:
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value < 1 if open_high else value <= 1
    if not (low_ok and high_ok):
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ParamsError(f"{key}: {value} is not in {lo}0, 1{hi}")
