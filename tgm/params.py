"""Typed view of `params.yaml`, checked once when it is read.

params.yaml is the one source of every default: these models declare types and ranges, not values, so a key
missing from the file is an error rather than a silent fallback. A wrong type, an unknown key or an
out-of-range value raises `ParamsError` naming the dotted key, so a typo in `dvc exp run -S` fails before any
work starts. Types are strict (no "5" for 5, no 1 for true); integers are accepted where numbers are expected.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, create_model, field_validator

from tgm.errors import UserError


class ParamsError(UserError, ValueError):
    """A value in params.yaml is missing, of the wrong type, or out of range."""

    exit_code = 2  # argparse's code for a usage error


Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # strict floats still take ints (lr: 1 is 1.0)
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]
Positive = Annotated[float, Strict(), Field(gt=0)]


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def cross_check(self, group: str) -> None:
        """Rules that tie two keys together; `group` is this group's name in params.yaml."""


BUILTIN = ("mnist5k", "digits", "fashion-mnist")


def _check_source(source: str, labelled: bool = True) -> str:
    kind, _, arg = source.partition(":")
    if kind == "builtin" and labelled and arg not in BUILTIN:
        raise ValueError(f"unknown built-in dataset {arg!r} (use {', '.join(BUILTIN)})")
    if kind == "folder" and not arg:
        raise ValueError("'folder:' needs a path, e.g. folder:data/sources/pets")
    if kind != "folder" and not (labelled and kind == "builtin"):
        expected = "builtin:NAME or folder:PATH" if labelled else "folder:PATH"
        raise ValueError(f"{source!r} is not {expected}")
    return source


class IngestParams(Group):
    source: Str = Field(description="the labelled source: builtin:NAME or folder:PATH (layouts: docs/own-data.md)")
    unlabelled: tuple[Str, ...] = Field(description="unlabelled pools for pretraining: folder:PATH, any layout")
    labels_per_class: Int | None = Field(
        ge=1, description="keep this many labels per class of the training images, pool the rest (null: all)"
    )
    seed: Int = Field(description="which images keep their labels under labels_per_class")

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        return _check_source(source)

    @field_validator("unlabelled")
    @classmethod
    def _pool_sources(cls, pools: tuple[str, ...]) -> tuple[str, ...]:
        for pool in pools:
            _check_source(pool, labelled=False)
        if len(set(pools)) != len(pools):
            raise ValueError("the same pool is listed twice")
        return pools


class BaseParams(Group):
    """A pretrained model to start from instead of a random initialisation (docs/own-data.md, "A base")."""

    path: Str | None = Field(description="its folder (models/pretrained of another project); null: none")


class ValidateParams(Group):
    min_images_per_class: Int = Field(ge=1)
    max_reject_fraction: Fraction
    min_side: Int = Field(ge=1, description="pixels; smaller images cannot be resized into anything meaningful")
    max_pixels: Int = Field(ge=1, description="decompression-bomb limit: larger images are refused, not decoded")
    max_aspect: Float = Field(ge=1, description="longest side / shortest side")
    allowed_formats: tuple[Str, ...] = Field(min_length=1)
    near_constant_std: Float = Field(ge=0, description="grey-level std below which an image is flagged as blank")
    max_class_imbalance: Float = Field(ge=1, description="largest class / smallest class, reported when exceeded")


class PrepareParams(Group):
    image_size: Int = Field(ge=2)
    palette_size: Int = Field(ge=2, le=4096)
    color_mode: Literal["auto", "grey", "rgb"]
    val_fraction: Float = Field(gt=0, lt=1)
    test_fraction: Float = Field(gt=0, lt=1)
    seed: Int
    kmeans_sample_pixels: Int = Field(ge=1000)

    def cross_check(self, group: str) -> None:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ParamsError(f"{group}.val_fraction + {group}.test_fraction must leave at least 10% for training")


class ModelParams(Group):
    n_layer: Int = Field(ge=1)
    n_head: Int = Field(ge=1)
    n_embd: Int = Field(ge=8)
    dropout: Float = Field(ge=0, lt=1)

    def cross_check(self, group: str) -> None:
        if self.n_embd % self.n_head:
            raise ParamsError(f"{group}.n_embd ({self.n_embd}) must be divisible by {group}.n_head ({self.n_head})")


class TrainParams(Group):
    """Optimisation settings shared by pretraining and fine-tuning (one training loop serves both)."""

    epochs: Int = Field(ge=0, description="0 only for pretrain from a base: fine-tune straight from it")
    batch_size: Int = Field(ge=1)
    lr: Float = Field(gt=0, lt=1)
    weight_decay: Float = Field(ge=0)
    warmup_fraction: Float = Field(ge=0, lt=1)
    min_lr_fraction: Fraction
    grad_clip: Float = Field(ge=0)
    patience: Int = Field(ge=1, description="epochs without validation improvement before stopping early")
    seed: Int
    device: Str = Field(description="auto | cpu | cuda | cuda:N")
    grad_accum: Int = Field(ge=1, description="micro-batches per optimizer step; batch_size stays the global batch")
    precision: Literal["auto", "fp32", "bf16"] = Field(description="auto: bf16 where the device runs it natively")
    compile: Bool = Field(description="torch.compile each transformer block for training (pays off on CUDA)")
    checkpoint_every: Int = Field(ge=0, description="optimizer steps between crash-safe checkpoints; 0: off")
    augment_shift: Int = Field(ge=0, description="shift training images by up to this many pixels")
    augment_rotate: Float = Field(ge=0, le=180, description="rotate training images by up to this many degrees")
    augment_scale: Float = Field(ge=0, lt=1, description="zoom training images in or out by up to this fraction")
    max_steps: Int | None = Field(
        ge=1, description="stop after this many optimizer steps (null: run the epochs); the schedule still spans them"
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ValueError(f"{device!r} is not auto, cpu, cuda or cuda:N")
        return device

    def cross_check(self, group: str) -> None:
        if self.batch_size < self.grad_accum:
            raise ParamsError(
                f"{group}.grad_accum: {self.grad_accum} micro-batches cannot split a batch of {self.batch_size}"
            )


class FinetuneParams(TrainParams):
    lambda_gen: Float = Field(ge=0, description="weight of the next-pixel loss next to the class loss")
    cls_grid: Int = Field(ge=1, description="the head averages features over cls_grid x cls_grid image regions")
    unlabelled: Bool = Field(description="each batch also takes as many pool images, for the next-pixel loss")

    def cross_check(self, group: str) -> None:
        super().cross_check(group)
        if self.epochs < 1:
            raise ParamsError(f"{group}.epochs must be at least 1")


class ProbeParams(Group):
    """Linear probes on the pretrained model: logistic regression on each layer's average-pooled features."""

    C: Positive = Field(description="inverse L2 strength of the logistic regression")
    max_iter: Int = Field(ge=10)


LearningRates = tuple[Annotated[float, Strict(), Field(gt=0, lt=1)], ...]
PositiveGrid = tuple[Positive, ...]


class StudyParams(Group):
    """Label-efficiency study (protocol in tgm/study.py and docs/study.md): every arm on the same labelled
    subsets, each selecting its settings on a held-out part of its subset only."""

    fractions: tuple[Annotated[float, Strict(), Field(gt=0, le=1)], ...] = Field(min_length=1)
    per_class: tuple[Annotated[int, Strict(), Field(ge=2)], ...] = Field(
        description="labelled images per class of each subset, instead of study.fractions (empty: fractions)"
    )
    subsets: Int = Field(ge=1, description="label subsets per share (seeds seed, seed+1, ...)")
    folds: Int = Field(ge=1, description="selection inside each subset: 1 = one holdout, k >= 2 = k-fold")
    holdout: Float = Field(gt=0, lt=1, description="with folds 1: share of each subset held out for selection")
    steps: Int = Field(ge=1, description="optimizer steps of the pretrained fine-tune's selection runs")
    scratch_steps: Int = Field(ge=1, description="... and of the from-scratch arm's")
    unlabelled: Bool = Field(description="neural arms add the next-pixel loss on the unlabelled training images")
    finetune_lrs: LearningRates = Field(min_length=1)
    scratch_lrs: LearningRates = Field(min_length=1)
    probe_C: PositiveGrid = Field(min_length=1)
    logreg_C: PositiveGrid = Field(min_length=1)
    svm_C: PositiveGrid = Field(min_length=1)
    svm_gamma_scale: PositiveGrid = Field(min_length=1, description="multiples of scikit-learn's gamma='scale'")
    knn_k: tuple[Annotated[int, Strict(), Field(ge=1)], ...] = Field(min_length=1)
    labelled_only_steps: Int = Field(
        ge=0, description="> 0: the arm pretrained on its labelled subset's pixels alone, for this many steps"
    )
    labelled_only_lr: Float = Field(gt=0, lt=1, description="... at this learning rate")
    seed: Int


class EvaluateParams(Group):
    completion_images: Int = Field(ge=1)
    completion_samples: Int = Field(ge=1)
    temperature: Positive
    top_k: Int = Field(ge=0, description="0 samples from the whole palette")
    seed: Int
    svm_reference: Bool = Field(description="fit an RBF SVM on the same split, as a yardstick")
    typicality_quantile: Float = Field(
        gt=0.5, lt=1, description="share of validation images below the atypical threshold of bits per pixel"
    )
    ood_images: Int = Field(ge=10, description="images in each out-of-distribution set typicality is scored on")


class DriftParams(Group):
    """`tgm drift` and the drift flow: a folder of new images scored against the training distribution."""

    folder: Str = Field(min_length=1, description="the folder of new images (any layout; labels unused)")
    max_atypical_share: Fraction = Field(description="drift when more of the images are atypical than this")
    min_p_value: Fraction = Field(description="drift when the KS test's p-value is below this")
    min_images: Int = Field(ge=1, description="fewer readable images than this: too few to judge")


class GateParams(Group):
    min_accuracy: Fraction
    min_macro_f1: Fraction
    max_regression: Fraction | None = Field(description="null: no comparison with the champion")
    task: Annotated[str, Strict(), Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] | None = Field(
        description="the task champions are kept under (letters, digits, . _ -); null: the data source and classes"
    )


class PackageParams(Group):
    model_name: Annotated[str, Strict(), Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    build_bento: Bool


# params.yaml's group `validate` shadows pydantic's deprecated `BaseModel.validate` classmethod, which nothing
# here calls; the group keeps its name rather than grow an alias.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        ingest: IngestParams
        validate: ValidateParams
        prepare: PrepareParams
        base: BaseParams
        model: ModelParams
        pretrain: TrainParams
        finetune: FinetuneParams
        probe: ProbeParams
        study: StudyParams
        evaluate: EvaluateParams
        gate: GateParams
        package: PackageParams
        drift: DriftParams


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and check params.yaml: every group and key must be there, with a value of the right type and range."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such file (run from the project root, or pass --params)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw)


def parse_params(raw: Any) -> Params:
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml: the top level must be a mapping of stage groups")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_describe(exc)) from None
    for name in Params.model_fields:
        getattr(params, name).cross_check(name)
    if params.pretrain.epochs == 0 and params.base.path is None:
        raise ParamsError("pretrain.epochs: 0 epochs means fine-tuning straight from a base, and base.path is null")
    return params


G = TypeVar("G", bound=Group)


def replace(group: G, name: str = "params", **changes: Any) -> G:
    """A copy of a params group with some values changed, checked like params.yaml; `name` names the group in
    errors."""
    try:
        new = type(group).model_validate({**group.model_dump(), **changes})
    except ValidationError as exc:
        raise ParamsError(_describe(exc)) from None
    new.cross_check(name)
    return new


def override(params: Params, pairs: dict[str, Any]) -> Params:
    """`params` with the dotted keys of `pairs` set (`drift.folder` ...), checked like params.yaml."""
    groups: dict[str, dict] = {}
    for dotted, value in pairs.items():
        group, _, key = dotted.partition(".")
        groups.setdefault(group, {})[key] = value
    return params.model_copy(
        update={g: replace(getattr(params, g), name=g, **changes) for g, changes in groups.items()}
    )


def _describe(exc: ValidationError) -> str:
    """Pydantic's errors as `dotted.key: what is wrong (got value)`, the first three of them."""
    lines = []
    for err in exc.errors()[:3]:
        key = ".".join(str(part) for part in err["loc"]) or "params.yaml"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            message = "missing from params.yaml (it holds every default; copy the key from the project's file)"
        elif err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] != "value_error" and "input" in err and not isinstance(err["input"], dict):
            message += f" (got {err['input']!r})"
        lines.append(f"{key}: {message}")
    more = len(exc.errors()) - len(lines)
    return "; ".join(lines) + (f"; and {more} more" if more > 0 else "")


def _optional(model: type[BaseModel], name: str) -> type[BaseModel]:
    """`model` with every field optional (None: keep params.yaml's value), for the Prefect run form."""
    fields: dict[str, Any] = {}
    for key, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = _optional(annotation, f"{annotation.__name__}Override")
        fields[key] = (annotation | None, Field(default=None, description=info.description))
    with warnings.catch_warnings():  # the `validate` group again (see Params)
        warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)
        return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


# What the Prefect flow's form offers: every key of params.yaml, blank by default (blank keeps the file's value).
ParamsOverride = _optional(Params, "ParamsOverride")


def override_pairs(override: BaseModel | dict | None) -> dict[str, Any]:
    """The `group.key: value` pairs a `ParamsOverride` sets (its non-blank fields)."""
    if override is None:
        return {}
    if isinstance(override, BaseModel):
        override = override.model_dump(mode="json", exclude_none=True)
    return {f"{group}.{key}": value for group, keys in override.items() for key, value in (keys or {}).items()}
