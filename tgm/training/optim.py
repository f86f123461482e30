"""How the weights move: AdamW, its learning-rate schedule, and compiling the blocks that are trained."""

from __future__ import annotations

import math

import torch

from tgm.model import TGM
from tgm.params import TrainParams


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


def schedule(opt: torch.optim.Optimizer, total: int, params: TrainParams) -> torch.optim.lr_scheduler.LambdaLR:
    """lr_factor over `total` optimizer steps, warming up over params.warmup_fraction of them."""
    warmup, min_lr = max(1, int(total * params.warmup_fraction)), params.min_lr_fraction
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, min_lr))


def compile_blocks(model: TGM) -> None:
    """torch.compile each transformer block in place ("regional" compilation). The blocks share one graph,
    compiled once per input shape and reused by every layer, so compile time does not grow with depth; and
    `pretrain` and `finetune` run the same block graph, so the second stage finds it in inductor's on-disk
    cache (TORCHINDUCTOR_CACHE_DIR) instead of compiling again. Embedding, heads and losses stay eager."""
    import torch._inductor.config as inductor_config

    # seed_everything sets torch's flag alone (importing inductor costs seconds): inductor's kernels follow it here.
    inductor_config.deterministic = torch.are_deterministic_algorithms_enabled()
    for block in model.blocks:
        block.compile()
