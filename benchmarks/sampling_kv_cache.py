"""Image completion speed: KV-cached sampling vs recomputing the whole sequence each step, in one run.

    python benchmarks/sampling_kv_cache.py [--model models/pretrained] [--batch 32] [--repeats 3]

Uses the pretrained model when it exists, else a freshly initialised one of the params.yaml shape.
Prints seconds per completion batch for both paths, the speed-up, and whether both sampled the same pixels.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tgm.model import TGM, TGMConfig, load_model
from tgm.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/pretrained")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    if (Path(args.model) / "model.safetensors").exists():
        model, source = load_model(args.model), args.model
    else:
        p = load_params()
        size = p.prepare.image_size
        model = TGM(TGMConfig(palette_size=p.prepare.palette_size, seq_len=size * size, **p.model.model_dump()))
        source = "random init (params.yaml shape)"
    model.eval()
    prefix = torch.randint(0, model.cfg.palette_size, (args.batch, model.cfg.seq_len // 2))
    timings, outputs = {}, {}
    for use_cache in (False, True):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outputs[use_cache] = model.complete(prefix, torch.Generator().manual_seed(0), use_cache=use_cache)
            best = min(best, time.perf_counter() - t0)
        timings[use_cache] = best
    print(
        f"model: {source}; {model.num_params() / 1e6:.2f}M params, sequence {model.cfg.seq_len}, "
        f"batch {args.batch}, completing the bottom {model.cfg.seq_len - prefix.size(1)} pixels; "
        f"{torch.get_num_threads()} threads"
    )
    print(f"recompute each step : {timings[False]:.3f} s/batch (best of {args.repeats})")
    print(f"KV cache            : {timings[True]:.3f} s/batch (best of {args.repeats})")
    print(f"speed-up            : {timings[False] / timings[True]:.2f}x")
    print(f"same samples        : {bool(torch.equal(outputs[False], outputs[True]))}")


if __name__ == "__main__":
    main()
