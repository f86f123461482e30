"""The fixed parts of one training run (`Run`): the model as trained, its optimizer and schedule, the batches,
and one optimizer step."""

from __future__ import annotations

import contextlib

import torch

from tgm.model import TGM
from tgm.params import TrainParams
from tgm.training.data import Batches, Split
from tgm.training.device import Dist, autocast, resolve_precision
from tgm.training.objectives import Objective
from tgm.training.optim import compile_blocks, make_optimizer, schedule


class Run:
    """The fixed parts of one `fit`: the model as trained (DDP- and/or compile-wrapped), its optimizer and
    schedule, the batches, and how one optimizer step is taken."""

    def __init__(
        self, model: TGM, train: Split, pool, params: TrainParams, *, objective: Objective, device, dist: Dist
    ):
        self.model, self.params, self.objective, self.device, self.dist = model, params, objective, device, dist
        self.batches = Batches(train, pool, params, device)
        self.opt = make_optimizer(model, params)
        self.sched = schedule(self.opt, len(self.batches) * params.epochs, params)
        self.ddp = None
        if dist.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.trained: torch.nn.Module = self.ddp or model
        if params.compile:
            compile_blocks(model)
        self.amp_dtype = resolve_precision(params.precision, device)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this rank's micro-batches of the global batch; returns (summed loss, images)
        as a float64 tensor on the device, without waiting for it."""
        params, dist = self.params, self.dist
        # Every rank holds the whole global batch and takes its own consecutive micro-batches of it (views).
        parts = dist.world * params.grad_accum
        mine = slice(dist.rank * params.grad_accum, (dist.rank + 1) * params.grad_accum)
        micro = list(zip(xb.tensor_split(parts)[mine], yb.tensor_split(parts)[mine]))
        self.opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(2, dtype=torch.float64, device=self.device)
        for j, (x, y) in enumerate(micro):
            # A batch too small to give every rank a micro-batch still runs one (weighted 0) so that all ranks
            # take part in the gradient all-reduce.
            weight = len(x) / len(xb) * dist.world
            if len(x) == 0:
                x, y, weight = xb[:1], yb[:1], 0.0
            sync = self.ddp is None or j == len(micro) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync(), autocast(self.device, self.amp_dtype):
                loss, _ = self.objective.loss(self.trained, x, y)
            (loss * weight).backward()
            if weight:
                loss_sum[0] += loss.detach().double() * len(x)
                loss_sum[1] += len(x)
        if params.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), params.grad_clip)
        self.opt.step()
        self.sched.step()
        if dist.world > 1:
            torch.distributed.all_reduce(loss_sum)
        return loss_sum
