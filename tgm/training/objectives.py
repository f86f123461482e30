"""What a model is trained for, each an object that owns its loss, its summary of a split and the validation
metric early stopping watches:

- Generative (pretrain): next-pixel cross-entropy, labels unused.
- Classify (finetune): class cross-entropy + lambda_gen * next-pixel cross-entropy (iGPT's joint loss). Label -1
  marks an unlabelled image, which adds to the next-pixel loss only (the semi-supervised fine-tune).

`evaluate_split` scores a model on a split with either; evaluate, probe, study and typicality need this and the
model, never the training loop.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tgm.model import next_pixel_loss
from tgm.training.data import Split
from tgm.training.device import as_long, autocast

LN2 = math.log(2.0)
SUMMED = ("gen_loss", "cls_loss", "correct")  # what evaluate_split adds up over a split's batches


@dataclass(frozen=True)
class Generative:
    name = "generative"
    monitor = "gen_loss"  # early stopping watches the validation loss of what is trained for

    def loss(self, model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor | None):
        """The loss to minimise for a batch, and its detached parts."""
        logits, _ = model(tokens)
        gen = next_pixel_loss(logits, tokens)
        return gen, {"gen_loss": gen.detach()}

    def summary(self, sums: dict, n: int) -> dict:
        """Mean losses of a split from the sums of SUMMED; bits per pixel = next-pixel loss / ln 2."""
        gen = sums["gen_loss"] / n
        return {"gen_loss": gen, "bpp": gen / LN2, "loss": gen}


@dataclass(frozen=True)
class Classify(Generative):
    lambda_gen: float = 0.0
    name = "classify"
    monitor = "cls_loss"

    def loss(self, model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor | None):
        logits, class_logits = model(tokens)
        gen = next_pixel_loss(logits, tokens)
        per_image = F.cross_entropy(class_logits.float(), labels, ignore_index=-1, reduction="none")
        cls = per_image.sum() / (labels >= 0).sum().clamp(min=1)
        correct = (class_logits.argmax(-1) == labels).sum()
        return cls + self.lambda_gen * gen, {"gen_loss": gen.detach(), "cls_loss": cls.detach(), "correct": correct}

    def summary(self, sums: dict, n: int) -> dict:
        gen, cls = sums["gen_loss"] / n, sums["cls_loss"] / n
        return {
            "gen_loss": gen,
            "bpp": gen / LN2,
            "cls_loss": cls,
            "accuracy": sums["correct"] / n,
            "loss": cls + self.lambda_gen * gen,
        }


Objective = Generative | Classify


def _eager():
    """Compiled blocks (compile: true) run eager here: compilation is for training, and validation's shapes
    (no grad, a larger batch, the split's own last batch) would each compile again. Nothing is compiled in a
    process that never imported dynamo, and importing it only to say so costs each stage seconds."""
    if "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    split: Split,
    objective: Objective,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict:
    """`objective`'s summary of a split (its tokens and labels may be tensors already on the device)."""
    model.eval()
    with _eager():
        sums = torch.zeros(len(SUMMED), dtype=torch.float64, device=device)  # read once, at the end
        n = len(split)
        for i in range(0, n, batch_size):
            x = as_long(split.tokens[i : i + batch_size], device)
            y = None if split.labels is None else as_long(split.labels[i : i + batch_size], device)
            with autocast(device, amp_dtype):
                _, parts = objective.loss(model, x, y)
            for j, k in enumerate(SUMMED):
                if k in parts:
                    sums[j] += parts[k].double() * (1 if k == "correct" else len(x))
    return objective.summary(dict(zip(SUMMED, sums.tolist())), n)
