"""What the benchmarks share: the FLOP count of a training step and the device's measured matmul peak."""

from __future__ import annotations

import time

import torch

from tgm.model import TGMConfig


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
