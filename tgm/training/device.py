"""Where training runs: the torchrun process group, the device, mixed precision, seeds and host-to-device copies."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from tgm.errors import DeviceUnavailable


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


def teardown_distributed(barrier: bool = True) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if barrier:
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
    # The flag alone: torch.use_deterministic_algorithms also sets inductor's, and importing inductor to do so
    # costs every stage seconds; compile_blocks sets inductor's flag where a run compiles.
    torch._C._set_deterministic_algorithms(True, warn_only=True)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. A host tensor goes to a GPU through pinned memory, asynchronously: a plain `.to("cuda")`
    from pageable memory waits for every kernel already queued, which would stall the loop once per batch."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def as_long(rows, device: torch.device) -> torch.Tensor:
    """Token or label rows (an array or a tensor) as int64 on `device`."""
    if isinstance(rows, torch.Tensor):
        return rows.to(device).long()
    return to_device(torch.from_numpy(np.asarray(rows, dtype=np.int64)), device)
