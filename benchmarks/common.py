"""What the benchmarks share: the training step they time, the FLOP count of a step and the device's measured
matmul peak."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tgm.model import TGMConfig
from tgm.params import load_params, replace
from tgm.training.device import autocast
from tgm.training.objectives import Generative
from tgm.training.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def optimizer(model: torch.nn.Module, **changes) -> torch.optim.Optimizer:
    """The pipeline's optimizer for `model`, configured from params.yaml's pretrain group with `changes`."""
    return make_optimizer(model, replace(load_params(ROOT / "params.yaml").pretrain, name="pretrain", **changes))


def train_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, device: torch.device, amp: torch.dtype | None
) -> None:
    """One next-pixel training step as tgm.training.loop.fit takes it: autocast forward, backward, clipping, update."""
    with autocast(device, amp):
        loss, _ = Generative().loss(model, x, None)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_flops_per_token(cfg: TGMConfig) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward), PaLM's convention as nanoGPT uses
    it: 6 x the parameters in matrix multiplies (blocks + output head) plus 12 x layers x width x sequence for
    attention scores and the weighted sum. Embedding lookups and elementwise work are not counted."""
    return matmul_train_flops_per_token(cfg) + 12.0 * cfg.n_layer * cfg.n_embd * cfg.seq_len


def matmul_train_flops_per_token(cfg: TGMConfig) -> float:
    """The weight-matrix part of train_flops_per_token: 6 x the parameters in matrix multiplies."""
    return 6.0 * (cfg.n_layer * 12 * cfg.n_embd**2 + cfg.n_embd * cfg.palette_size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n matrix product in `dtype`: the ceiling our FLOP/s is put over."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def load_study_inputs(project: Path):
    """A project's params and the study's inputs (splits, and the features of every image), timed: what the
    benchmarks that re-run parts of the label-efficiency study start from."""
    from tgm.study import StudyInputs

    params = load_params(project / "params.yaml")
    t0 = time.perf_counter()
    inputs = StudyInputs.load(project / "data/prepared", project / "models/pretrained", params.finetune)
    print(f"features of {inputs.train[1].size} training and {inputs.test[1].size} test images: "
          f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    return params, inputs


def study_subsets(labels, study, per_class_counts, subsets: int):
    """The study's labelled subsets and selection parts, seed for seed (tgm/study.py's run_subset):
    (per_class, subset, seed, indices, folds) for each share and subset."""
    from tgm.study import label_subset, selection_folds

    for per_class in per_class_counts:
        for subset in range(subsets):
            seed = study.seed + subset
            idx = label_subset(labels, None, seed, min_per_class=max(2, study.folds), per_class=per_class)
            parts = selection_folds(labels[idx], study.folds, study.holdout, seed)
            yield per_class, subset, seed, idx, [{"fit": idx[f], "select": idx[s]} for f, s in parts]


def probe_candidates(features, study) -> list[dict]:
    """The study's probe settings: each layer past the embedding, or all concatenated, times study.probe_C."""
    layers = [*range(1, features.shape[0]), "all"]
    return [{"C": c, "layer": layer} for layer in layers for c in study.probe_C]
