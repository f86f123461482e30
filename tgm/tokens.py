"""A split's token array read from its .npy file a batch or a block at a time, never held whole in memory.

Training keeps per image only its label and its place in the epoch's shuffle (8 + 8 bytes); the tokens are read
from disk as each batch needs them (page cache, not process memory), so the peak memory of `pretrain` and
`finetune` stays the model's, the optimizer's and one batch's, however many images there are. Rows come back as
int64, what the model's embedding takes; on disk they stay uint8 (uint16 past 256 colours).

On a GPU the split is instead copied to the device once (`on_device`) when it fits there: a few MB for tens of
thousands of small images, and no host read, copy or wait per batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

BLOCK_ROWS = 8192  # rows per read when a whole split is scanned: a few MB, even as int64


class TokenFile:
    """Rows of a 2-D .npy array by index (`tf[idx]`, idx an int array) or by slice (`tf[a:b]`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(f)
            self.offset = f.tell()
        if len(shape) != 2 or fortran_order:
            raise ValueError(f"{self.path}: expected a C-ordered 2-D array, found shape {shape}")
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.row_bytes = shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        return self.read(key).astype(np.int64)

    def read(self, key) -> np.ndarray:
        """Rows `key` (an int array or a slice) in the stored dtype."""
        with open(self.path, "rb", buffering=0) as f:
            fd = f.fileno()
            if isinstance(key, slice):
                start, stop, step = key.indices(len(self))
                if step != 1:
                    raise IndexError("TokenFile slices take no step")
                count = max(0, stop - start)
                data = os.pread(fd, count * self.row_bytes, self.offset + start * self.row_bytes)
            else:
                idx = np.asarray(key, dtype=np.int64).reshape(-1)
                if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
                    raise IndexError(f"row index out of range 0..{len(self) - 1}")
                count = len(idx)
                data = b"".join(os.pread(fd, self.row_bytes, self.offset + int(i) * self.row_bytes) for i in idx)
        return np.frombuffer(data, self.dtype).reshape(count, self.shape[1])

    def blocks(self) -> Iterator[np.ndarray]:
        """The whole array, BLOCK_ROWS rows at a time, in the stored dtype."""
        for start in range(0, len(self), BLOCK_ROWS):
            yield self.read(slice(start, start + BLOCK_ROWS))


class TokenFiles:
    """Several token files of one sequence length read as one array (a split and the unlabelled pool, for
    pretraining): rows by index or slice, and blocks, like a TokenFile."""

    def __init__(self, parts: list[TokenFile]):
        if len({(p.shape[1], p.dtype) for p in parts}) != 1:
            raise ValueError("token files of different sequence lengths or dtypes: " + ", ".join(map(str, parts)))
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape, self.dtype = (int(self.starts[-1]), parts[0].shape[1]), parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        return self.read(key).astype(np.int64)

    def read(self, key) -> np.ndarray:
        idx = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range 0..{len(self) - 1}")
        part = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty((len(idx), self.shape[1]), self.dtype)
        for k in np.unique(part):
            mine = part == k
            out[mine] = self.parts[k].read(idx[mine] - self.starts[k])
        return out

    def blocks(self) -> Iterator[np.ndarray]:
        for p in self.parts:
            yield from p.blocks()


def resident_dtype(dtype) -> np.dtype:
    """The dtype a split takes on the device: the stored one, uint16 widened to int32 (which torch indexes)."""
    return np.dtype(np.int32) if np.dtype(dtype) == np.uint16 else np.dtype(dtype)


def nbytes(tokens: TokenFile | np.ndarray) -> int:
    """What `on_device` will take on the device."""
    return len(tokens) * tokens.shape[1] * resident_dtype(tokens.dtype).itemsize


def on_device(tokens: TokenFile | np.ndarray, device) -> torch.Tensor:
    """The whole split as one tensor on `device` (in `resident_dtype`): training then gathers each batch there
    instead of reading and copying it. Filled block by block, so the host holds one block at a time."""
    import torch  # noqa: F811 (imported here: this module is read where torch is not needed)

    dtype = resident_dtype(tokens.dtype)
    out = torch.empty(tuple(tokens.shape), dtype=torch.from_numpy(np.empty(0, dtype)).dtype, device=device)
    if isinstance(tokens, TokenFile | TokenFiles):
        blocks = tokens.blocks()
    else:
        blocks = (tokens[i : i + BLOCK_ROWS] for i in range(0, len(tokens), BLOCK_ROWS))
    start = 0
    for block in blocks:
        out[start : start + len(block)] = torch.from_numpy(np.array(block, dtype=dtype))  # a writable copy
        start += len(block)
    return out
