"""What torch.compile costs each training stage, and what it buys: whole-model compilation against the loop's
regional one (tgm.training.optim.compile_blocks) and eager, each stage in its own process as under `dvc repro`.

    python benchmarks/compile_cost.py [--device auto] [--modes eager,whole,blocks] [--steps 8]
                                      [--layers L --embd E --heads H --batch B --image-size S]

For each mode, with an inductor cache of its own (a fresh TORCHINDUCTOR_CACHE_DIR), three processes run one
after another: `pretrain` (cold cache), `finetune` (the cache pretrain left, as in the pipeline) and
`pretrain` again (a rerun). Each times its first training step (compilation), its first step on an epoch's
shorter last batch (a recompile for the new shape) and then `--steps` steady steps. Model, batch, pixels and
precision come from params.yaml (model, prepare, pretrain groups) unless overridden. Prints one row per
process and the compile seconds of pretrain + finetune per mode, with steady tokens/s as a ratio to eager.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import ROOT, optimizer, sync  # noqa: E402
from tgm.model import TGM, TGMConfig  # noqa: E402
from tgm.params import load_params  # noqa: E402
from tgm.training.device import autocast, resolve_device, resolve_precision  # noqa: E402
from tgm.training.objectives import Classify, Generative  # noqa: E402
from tgm.training.optim import compile_blocks  # noqa: E402

STAGES = (("pretrain", "generative"), ("finetune", "classify"), ("pretrain again", "generative"))


def child(args) -> dict:
    """One stage's process: compile as `args.mode` says, time the first, the shorter and the steady steps."""
    device = resolve_device(args.device)
    amp = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    classes = 10 if args.objective == "classify" else 0
    cfg = TGMConfig(
        palette_size=args.palette,
        seq_len=args.image_size**2,
        n_layer=args.layers,
        n_head=args.heads,
        n_embd=args.embd,
        n_classes=classes,
    )
    model = TGM(cfg).to(device).train()
    opt = optimizer(model)
    trained = model
    if args.mode == "whole":
        trained = torch.compile(model)
    elif args.mode == "blocks":
        compile_blocks(model)

    def step(batch: int) -> float:
        x = torch.randint(0, cfg.palette_size, (batch, cfg.seq_len), device=device)
        y = torch.randint(0, 10, (batch,), device=device) if classes else None
        t0 = time.perf_counter()
        with autocast(device, amp):
            loss, _ = (Classify(0.25) if args.objective == "classify" else Generative()).loss(trained, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0

    first = step(args.batch)
    step(args.batch)
    shorter = step(args.batch // 3 + 1)  # an epoch's last batch: any size below the full one
    step(args.batch // 3 + 1)
    steady = sum(step(args.batch) for _ in range(args.steps))
    return {
        "first_step_s": round(first, 2),
        "shorter_batch_s": round(shorter, 2),
        "tokens_per_s": round(args.steps * args.batch * cfg.seq_len / steady),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--modes", default="eager,whole,blocks")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--embd", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--objective", help=argparse.SUPPRESS)
    ap.add_argument("--palette", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    p = load_params(ROOT / "params.yaml")
    shape = {
        "layers": args.layers or p.model.n_layer,
        "embd": args.embd or p.model.n_embd,
        "heads": args.heads or p.model.n_head,
        "batch": args.batch or p.pretrain.batch_size,
        "image-size": args.image_size or p.prepare.image_size,
        "palette": p.prepare.palette_size,
        "precision": p.pretrain.precision,
        "device": args.device,
        "steps": args.steps,
    }
    print(
        f"{shape['layers']} x {shape['embd']}, {shape['heads']} heads, batch {shape['batch']}, "
        f"{shape['image-size']}x{shape['image-size']} pixels, precision {shape['precision']}, device {args.device}"
    )
    rows = []
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            for stage, objective in STAGES:
                cmd = [sys.executable, __file__, "--child", "--mode", mode, "--objective", objective]
                cmd += [f"--{k}={v}" for k, v in shape.items()]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                rows.append({"mode": mode, "stage": stage, **json.loads(out.strip().splitlines()[-1])})
                r = rows[-1]
                print(
                    f"{mode:>6} {stage:<15} first step {r['first_step_s']:7.2f} s  shorter batch "
                    f"{r['shorter_batch_s']:6.2f} s  steady {r['tokens_per_s']:>10,} tokens/s"
                )
    eager = [r["tokens_per_s"] for r in rows if r["mode"] == "eager"]
    print("\n  mode  compile s of pretrain + finetune  steady tokens/s / eager")
    for mode in args.modes.split(","):
        mine = [r for r in rows if r["mode"] == mode]
        paid = sum(r["first_step_s"] + r["shorter_batch_s"] for r in mine[:2])
        ratio = sum(r["tokens_per_s"] for r in mine) / sum(eager) if eager else float("nan")
        print(f"{mode:>6}  {paid:32.1f}  {ratio:22.2f}")
    print(json.dumps({"shape": shape, "rows": rows}))


if __name__ == "__main__":
    main()
