"""How much of the training step's speed the `pretrain` stage's loop delivers: the real tgm.training.loop.fit on
prepared data next to the bare benchmark step of the same configuration, timed in alternating rounds of one run.

    python benchmarks/stage_efficiency.py [--prepared data/prepared] [--device auto] [--rounds 3] [--epochs 1]

Model, batch size, precision and augmentation come from params.yaml (model and pretrain groups), so the figure
describes the stage as configured; --layers/--embd/--heads/--batch override them. The fit arm runs whole epochs
without a validation split or checkpoints, reading its tokens from disk as the stage does (what the loop itself
costs: reading batches, augmentation, host copies and syncs); the step arm runs the same number of optimizer
steps of benchmarks/common.train_step on tokens already on the device. Prints tokens/s of each, round by round,
and fit / step as a ratio (1.0: the loop costs nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import ROOT, optimizer, sync, train_step  # noqa: E402
from tgm.io import read_json  # noqa: E402
from tgm.model import TGM, TGMConfig  # noqa: E402
from tgm.params import load_params, replace  # noqa: E402
from tgm.prepare import stream_split  # noqa: E402
from tgm.training.data import Split  # noqa: E402
from tgm.training.device import resolve_device, resolve_precision  # noqa: E402
from tgm.training.loop import fit  # noqa: E402
from tgm.training.objectives import Generative  # noqa: E402


def fit_round(cfg: TGMConfig, train, params, device) -> float:
    """Tokens/s of tgm.training.loop.fit over `params.epochs` epochs, validation and checkpoints off."""
    torch.manual_seed(0)
    model = TGM(cfg).to(device)
    sync(device)
    t0 = time.perf_counter()
    fit(model, Split(*train), None, params, Generative(), device)
    sync(device)
    return params.epochs * len(train[0]) * train[0].shape[1] / (time.perf_counter() - t0)


def step_round(cfg: TGMConfig, steps: int, batch: int, device, amp) -> float:
    """Tokens/s of `steps` bare training steps of the same shape, inputs already on the device."""
    torch.manual_seed(0)
    model = TGM(cfg).to(device).train()
    opt = optimizer(model)
    x = torch.randint(0, cfg.palette_size, (batch, cfg.seq_len), device=device)
    train_step(model, opt, x, device, amp)  # one untimed step: allocator and kernels warm, as fit's first is not
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, x, device, amp)
    sync(device)
    return steps * batch * cfg.seq_len / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", default="data/prepared", help="prepared data (dvc repro prepare, or dvc pull)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--embd", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--batch", type=int)
    args = ap.parse_args()
    p = load_params(ROOT / "params.yaml")
    model_args = p.model.model_dump()
    for key, value in (("n_layer", args.layers), ("n_embd", args.embd), ("n_head", args.heads)):
        model_args[key] = value if value is not None else model_args[key]
    params = replace(
        p.pretrain,
        name="pretrain",
        epochs=args.epochs,
        checkpoint_every=0,
        device=args.device,
        batch_size=args.batch or p.pretrain.batch_size,
    )
    device = resolve_device(params.device)
    amp = resolve_precision(params.precision, device)
    train = stream_split(args.prepared, "train")  # as the stage reads it: a batch at a time from disk
    palette = read_json(Path(args.prepared) / "meta.json")["palette_size"]
    cfg = TGMConfig(palette_size=palette, seq_len=train[0].shape[1], **model_args)
    steps = -(-len(train[0]) // params.batch_size) * params.epochs
    print(
        f"{device}, {amp or 'fp32'}; {model_args['n_layer']} x {model_args['n_embd']}, batch {params.batch_size}, "
        f"{len(train[0])} images of {cfg.seq_len} pixels, {steps} steps per round"
    )
    fits, bare = [], []
    for r in range(args.rounds):
        fits.append(fit_round(cfg, train, params, device))
        bare.append(step_round(cfg, steps, params.batch_size, device, amp))
        print(f"round {r + 1}: fit {fits[-1]:,.0f} tokens/s, step {bare[-1]:,.0f} tokens/s, {fits[-1] / bare[-1]:.2f}")
    ratio = statistics.median(f / b for f, b in zip(fits, bare))
    print(f"median fit / step: {ratio:.2f}")
    print(json.dumps({"device": str(device), "fit_tokens_per_s": fits, "step_tokens_per_s": bare, "ratio": ratio}))


if __name__ == "__main__":
    main()
