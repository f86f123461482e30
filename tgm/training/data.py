"""What training reads: a `Split` (tokens and labels), and the `Batches` of each epoch drawn from one.

`Batches` owns where the data sits and how a batch is made. On a GPU a split that takes a small share of the
free memory is copied there once (tgm.tokens.on_device) and batches are gathered and augmented there; on the
CPU the tokens stream from disk a batch at a time (tgm.tokens.TokenFile). Every random draw (the epoch's
shuffle, the unlabelled images mixed in, the augmentation) comes from a CPU generator seeded from the params,
so a run draws the same on any device and after a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tgm.tokens import TokenFile, TokenFiles, nbytes, on_device
from tgm.training.device import as_long, to_device

RESIDENT_SHARE = 0.25  # a split is kept on the GPU when it takes at most this share of the free device memory


@dataclass(frozen=True)
class Split:
    """Images as token rows (read from disk, in memory, or on a device) and their labels (None: unlabelled)."""

    tokens: TokenFile | TokenFiles | np.ndarray | torch.Tensor
    labels: np.ndarray | torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def on(self, device: torch.device) -> Split:
        """The split held on `device`: tokens in their stored width, labels as int64."""
        labels = None if self.labels is None else as_long(self.labels, device)
        return Split(on_device(self.tokens, device), labels)


def resident(need: int, device: torch.device) -> bool:
    """Whether data of `need` bytes is copied to the device once, rather than read a batch at a time: on a GPU,
    when it takes a small share of the memory free there. On the CPU it streams, which bounds the memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return need <= RESIDENT_SHARE * free


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


class Batches:
    """The global batches of each epoch from a labelled split (labels unused by the generative objective),
    each with as many unlabelled pool images as labelled ones when there is a pool, augmented, on `device`:
    the whole global batch on every torchrun rank, which then takes its own micro-batches of it."""

    def __init__(self, train: Split, pool: np.ndarray | None, params, device: torch.device):
        self.params, self.device = params, device
        pool = pool if pool is not None and len(pool) else None
        need = nbytes(train.tokens) + (nbytes(np.asarray(pool)) if pool is not None else 0)
        self.data_device = device if resident(need, device) else torch.device("cpu")
        self.tokens = on_device(train.tokens, device) if self.data_device == device else train.tokens
        self.labels = as_long(train.labels, self.data_device)
        self.pool = on_device(np.asarray(pool), self.data_device) if pool is not None else None
        self.order_gen = torch.Generator().manual_seed(params.seed)  # the shuffle of each epoch
        self.aug_gen = torch.Generator().manual_seed(params.seed + 1)  # augmentation draws
        self.pool_gen = torch.Generator().manual_seed(params.seed + 2)  # which pool images join a batch

    def __len__(self) -> int:
        """Batches per epoch."""
        return math.ceil(len(self.tokens) / self.params.batch_size)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def epoch_order(self, state) -> torch.Tensor:
        """The epoch's shuffle: drawn at its first batch, replayed from the saved generator when resuming
        inside it (state.epoch_order_rng)."""
        if state.batch == 0:
            state.epoch_order_rng = self.order_gen.get_state()
        else:
            self.order_gen.set_state(state.epoch_order_rng)
        # Drawn on the CPU generator whatever the device, so that a resumed or moved run shuffles the same.
        return to_device(torch.randperm(len(self.tokens), generator=self.order_gen), self.data_device)

    def batch(self, order: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `b` of the epoch's `order`: its images and labels, with the pool's share, augmented."""
        idx = order[b * self.params.batch_size : (b + 1) * self.params.batch_size]
        params = self.params
        rows = self.tokens[idx] if self.data_device == self.device else self.tokens[idx.numpy()]
        xb, yb = as_long(rows, self.device), to_device(self.labels[idx], self.device)
        if self.pool is not None:  # interleaved, so that every micro-batch gets its share of both kinds
            draw = to_device(torch.randint(0, len(self.pool), (len(idx),), generator=self.pool_gen), self.data_device)
            extra = to_device(self.pool[draw], self.device).long()
            xb = torch.stack([xb, extra], dim=1).reshape(-1, xb.size(1))
            yb = torch.stack([yb, torch.full_like(yb, -1)], dim=1).reshape(-1)
        # Augmentation covers the whole global batch on every rank: the same draws as one process.
        if params.augment_rotate or params.augment_scale:
            xb = warp_images(xb, params.augment_rotate, params.augment_scale, self.aug_gen)
        if params.augment_shift:
            xb = shift_images(xb, params.augment_shift, self.aug_gen)
        return xb, yb

    def state_dict(self) -> dict:
        return {
            "order_rng": self.order_gen.get_state(),
            "aug_rng": self.aug_gen.get_state(),
            "pool_rng": self.pool_gen.get_state(),
        }

    def load_state_dict(self, saved: dict) -> None:
        self.order_gen.set_state(saved["order_rng"])
        self.aug_gen.set_state(saved["aug_rng"])
        if "pool_rng" in saved:  # checkpoints written before the unlabelled pool existed
            self.pool_gen.set_state(saved["pool_rng"])
