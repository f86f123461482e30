"""Pretraining throughput and model FLOP utilisation (MFU) on one GPU, for the README's GPU profile.

    python benchmarks/gpu_pretrain.py [--layers 8 --embd 512 --heads 8 --image-size 28 --batch 64]
                                      [--modes eager,compile] [--seconds 8] [--fit-check data/prepared]

Each mode times the training step the `pretrain` stage runs (bf16 autocast forward through SDPA, backward,
gradient clipping, AdamW) on random palette tokens, after warm-up, and prints tokens/s, achieved FLOP/s
(benchmarks/common.py's count) and MFU = achieved FLOP/s over this device's measured bf16 matmul peak
(8192^3 product, same run). --fit-check also runs tgm.training.loop.fit for one epoch on a prepared dataset with
the profile's precision and compile settings and a checkpoint, as the stage would on this device.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import matmul_peak, optimizer, sync, train_flops_per_token, train_step  # noqa: E402
from tgm.model import TGM, TGMConfig  # noqa: E402
from tgm.params import load_params, replace  # noqa: E402


def time_steps(model: torch.nn.Module, raw: TGM, batch: int, seconds: float, device: torch.device) -> float:
    """Tokens per second of full training steps, timed after warm-up for about `seconds`."""
    opt = optimizer(raw, lr=3e-4)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        x = torch.randint(0, raw.cfg.palette_size, (batch, raw.cfg.seq_len), device=device, generator=gen)
        train_step(model, opt, x, device, torch.bfloat16)

    for _ in range(5):  # compile, autotune, allocator warm-up
        step()
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    per_step = time.perf_counter() - t0
    n = max(5, math.ceil(seconds / per_step))
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return n * batch * raw.cfg.seq_len / (time.perf_counter() - t0)


def fit_check(prepared: Path, cfg_args: dict, device: torch.device, compile_model: bool) -> dict:
    import numpy as np

    from tgm.training.checkpoint import Checkpoints
    from tgm.training.data import Split
    from tgm.training.loop import fit
    from tgm.training.objectives import Generative

    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        return np.load(prepared / f"{split}_tokens.npy").astype(np.int64), np.load(prepared / f"{split}_labels.npy")

    train, val = load("train"), load("val")
    palette = int(max(train[0].max(), val[0].max())) + 1
    torch.manual_seed(0)
    model = TGM(TGMConfig(palette_size=palette, seq_len=train[0].shape[1], **cfg_args)).to(device)
    params = replace(
        load_params(Path(__file__).resolve().parents[1] / "params.yaml").pretrain,
        name="pretrain",
        epochs=1,
        batch_size=64,
        lr=1e-3,
        precision="bf16",
        compile=compile_model,
        checkpoint_every=20,
    )
    with tempfile.TemporaryDirectory() as ckpt_dir:
        t0 = time.perf_counter()
        history, _ = fit(
            model,
            Split(*train),
            Split(*val),
            params,
            Generative(),
            device,
            checkpoints=Checkpoints(ckpt_dir, "gpu-check", params.checkpoint_every, device),
        )
        wrote = (Path(ckpt_dir) / "checkpoint.pt").exists()
    return {
        "fit_seconds": round(time.perf_counter() - t0, 1),
        "val_bpp": round(history[-1]["val_bpp"], 4),
        "checkpoint_written": wrote,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--embd", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--palette", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--fit-check", type=Path, default=None, help="prepared data dir for a one-epoch fit")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_pretrain: no CUDA device visible; this benchmark is for the GPU profile")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak(device, torch.bfloat16, n=8192)
    cfg_args = {"n_layer": args.layers, "n_head": args.heads, "n_embd": args.embd}
    cfg = TGMConfig(palette_size=args.palette, seq_len=args.image_size**2, **cfg_args)
    flops = train_flops_per_token(cfg)
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print(f"bf16 matmul peak (8192^3): {peak / 1e12:.0f} TFLOP/s")
    print(
        f"model: {args.layers} layers x {args.embd} wide, {args.heads} heads, {cfg.seq_len} pixels, "
        f"palette {args.palette}, batch {args.batch}; {flops / 1e6:.1f} MFLOP per training token"
    )
    results = {"device": torch.cuda.get_device_name(device), "peak_tflops": round(peak / 1e12, 1)}
    for mode in args.modes.split(","):
        torch.manual_seed(0)
        raw = TGM(cfg).to(device)
        model = torch.compile(raw) if mode == "compile" else raw
        tps = time_steps(model, raw, args.batch, args.seconds, device)
        mfu = tps * flops / peak
        print(f"{mode:8s} {tps:12,.0f} tokens/s  {tps * flops / 1e12:7.1f} TFLOP/s  MFU {mfu:6.1%}")
        results[mode] = {"tokens_per_s": round(tps), "tflops": round(tps * flops / 1e12, 1), "mfu": round(mfu, 4)}
        del raw, model
        torch.cuda.empty_cache()
    if args.fit_check:
        small = {"n_layer": 4, "n_head": 4, "n_embd": 128}
        results["fit_check"] = fit_check(args.fit_check, small, device, compile_model=True)
        print(f"fit on {args.fit_check} (bf16, compiled, checkpointing): {results['fit_check']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
