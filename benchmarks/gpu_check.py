"""The GPU profile, stage by stage, on one GPU: pretrain, finetune and evaluate next to the benchmark step of the
same model, in one table. Written to spend a short device lease well: it prepares nothing on the device.

    # here, once (needs the whole project: GX, pandera, DVC): the profile's prepared data
    python benchmarks/gpu_check.py --prepare gpu-data        # gpu-data/: an ignored folder to carry
    # there (PYTHONPATH=. and, on a bare device, pandera and dvclive as carried wheels)
    python benchmarks/gpu_check.py --prepared gpu-data [--out $OUT] [--profile profiles/gpu.yaml]

Params are params.yaml with the profile's values (tgm.profiles), so the stages run exactly as `make run-gpu`
would run them. The benchmark arm is benchmarks/gpu_pretrain.py's step of the profile's model (eager, the
whole model compiled, and the blocks compiled as the stages compile them; bf16): tokens/s and MFU against this
device's measured bf16 matmul peak. Each stage's tokens/s is the tokens it trained on (epochs run x training
images x pixels) over its whole wall time, compile warm-up and validation included: what the user waits for.
Prints one table and a JSON line, and writes both to --out.
--quick shrinks model, data and epochs so that the whole script runs on a CPU in a minute (to test it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import matmul_peak, train_flops_per_token  # noqa: E402
from benchmarks.gpu_pretrain import time_steps  # noqa: E402
from tgm.model import TGM, TGMConfig  # noqa: E402
from tgm.params import Params, replace  # noqa: E402
from tgm.profiles import apply  # noqa: E402
from tgm.training.optim import compile_blocks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"n_layer": 1, "n_head": 2, "n_embd": 32}
MODES = ("eager", "compile", "compile blocks")  # the whole model compiled is the reference of every ratio


def profile_params(profile: Path, quick: bool) -> Params:
    p = apply(profile, ROOT / "params.yaml")
    if quick:
        p = p.model_copy(
            update={
                "prepare": replace(p.prepare, "prepare", image_size=8),
                "model": replace(p.model, "model", **QUICK),
                "pretrain": replace(p.pretrain, "pretrain", epochs=1, max_steps=5, device="cpu"),
                "finetune": replace(p.finetune, "finetune", epochs=1, max_steps=5, device="cpu"),
                "evaluate": replace(p.evaluate, "evaluate", svm_reference=False, completion_images=2),
            }
        )
    return p


def prepare_data(p: Params, dest: Path, source: str) -> None:
    """ingest, validate and prepare of the profile's data into `dest` (run here, where GX and pandera are)."""
    from tgm.ingest import ingest
    from tgm.prepare import prepare
    from tgm.validate import validate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ingest(replace(p.ingest, "ingest", source=source), tmp / "raw")
        validate(p.validate, tmp / "raw", tmp / "validated", tmp / "validation.json", None)
        prepare(p.prepare, tmp / "validated", tmp / "raw", tmp / "prepared")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(tmp / "prepared", dest)


def benchmark(p: Params, seq_len: int, palette: int, device: torch.device, seconds: float) -> dict:
    cfg = TGMConfig(palette_size=palette, seq_len=seq_len, **p.model.model_dump())
    peak = matmul_peak(device, torch.bfloat16, n=8192 if device.type == "cuda" else 512)
    out = {"peak_tflops": peak / 1e12, "flops_per_token": train_flops_per_token(cfg)}
    for mode in MODES if device.type == "cuda" else ("eager",):
        torch.manual_seed(0)
        raw = TGM(cfg).to(device)
        if mode == "compile blocks":  # what the stages do with compile: true
            compile_blocks(raw)
        model = torch.compile(raw) if mode == "compile" else raw
        tps = time_steps(model, raw, p.pretrain.batch_size, seconds, device)
        out[mode] = {"tokens_per_s": tps, "mfu": tps * out["flops_per_token"] / peak}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", type=Path, default=ROOT / "profiles/gpu.yaml")
    ap.add_argument("--prepare", type=Path, help="write the profile's prepared data here, and stop")
    ap.add_argument("--source", default="builtin:mnist5k")
    ap.add_argument("--prepared", type=Path, help="prepared data made with --prepare")
    ap.add_argument("--out", type=Path, help="where to write the table, the JSON and the stages' outputs")
    ap.add_argument("--seconds", type=float, default=8.0, help="timing of each benchmark mode")
    ap.add_argument("--quick", action="store_true", help="a tiny model for a CPU test of this script")
    args = ap.parse_args()
    p = profile_params(args.profile, args.quick)
    if args.prepare:
        prepare_data(p, args.prepare, args.source)
        print(f"prepared {args.prepare} for {args.profile}: carry it and pass --prepared {args.prepare}")
        return
    if not args.prepared:
        sys.exit("gpu_check: give --prepared DIR (made with --prepare DIR where the whole project is installed)")
    from tgm.evaluate import evaluate
    from tgm.io import read_json
    from tgm.training.device import resolve_device
    from tgm.training.stages import finetune, pretrain

    meta = read_json(args.prepared / "meta.json")
    if meta["image_size"] != p.prepare.image_size or meta["palette_size"] != p.prepare.palette_size:
        sys.exit(
            f"gpu_check: {args.prepared} is {meta['image_size']}px/{meta['palette_size']} colours; the profile "
            f"wants {p.prepare.image_size}px/{p.prepare.palette_size}: run --prepare again"
        )
    device = resolve_device(p.pretrain.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work = out / "work"
    tokens_per_epoch = meta["split_sizes"]["train"] * meta["seq_len"]
    bench = benchmark(p, meta["seq_len"], meta["palette_size"], device, args.seconds)
    reference = bench.get("compile", bench["eager"])["tokens_per_s"]
    rows, results = [], {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for mode in MODES:
        if mode in bench:
            b = bench[mode]
            rows.append(
                (f"benchmark step, {mode}", None, b["tokens_per_s"], b["tokens_per_s"] / reference, b["mfu"], None)
            )
    stages = {
        "pretrain": lambda: pretrain(
            p.pretrain,
            model=p.model,
            base=p.base,
            prepared_dir=args.prepared,
            out_dir=work / "pretrained",
            metrics_path=work / "pretrain.json",
            curve_path=work / "pretrain_curve.csv",
            checkpoint_dir=work / "ckpt_pretrain",
            live_dir=work / "live_pretrain",
        ),
        "finetune": lambda: finetune(
            p.finetune,
            prepared_dir=args.prepared,
            pretrained_dir=work / "pretrained",
            out_dir=work / "classifier",
            metrics_path=work / "finetune.json",
            curve_path=work / "finetune_curve.csv",
            checkpoint_dir=work / "ckpt_finetune",
            live_dir=work / "live_finetune",
        ),
        "evaluate": lambda: evaluate(
            p.evaluate,
            prepared_dir=args.prepared,
            classifier_dir=work / "classifier",
            pretrained_dir=work / "pretrained",
            metrics_path=work / "evaluate.json",
            confusion_path=work / "confusion.csv",
            completions_path=work / "completions.png",
            typicality_path=work / "typicality.json",
        ),
    }
    for name, run in stages.items():
        t0 = time.perf_counter()
        metrics = run()
        seconds = time.perf_counter() - t0
        results[name] = {"seconds": seconds, "metrics": metrics}
        if name == "evaluate":
            rows.append((name, seconds, None, None, None, metrics["accuracy"]))
            continue
        steps_cap = getattr(p, name).max_steps
        trained = metrics["epochs_run"] * tokens_per_epoch
        if steps_cap:  # a --quick run stops early: count the tokens of the steps it took
            trained = min(trained, steps_cap * getattr(p, name).batch_size * meta["seq_len"])
        tps = trained / seconds
        rows.append(
            (name, seconds, tps, tps / reference, tps * bench["flops_per_token"] / (bench["peak_tflops"] * 1e12), None)
        )
        results[name]["tokens_per_s"] = tps
    results["benchmark"] = bench
    lines = [
        f"{results['device']}, torch {torch.__version__}, profile {args.profile.name}"
        + (" (--quick)" if args.quick else ""),
        f"{'what':<26} {'wall s':>8} {'tokens/s':>12} {'/ bench':>8} {'MFU':>7} {'test acc':>9}",
    ]
    for what, seconds, tps, ratio, mfu, acc in rows:
        cell = lambda v, f: format(v, f) if v is not None else ""  # noqa: E731
        lines.append(
            f"{what:<26} {cell(seconds, '8.1f'):>8} {cell(tps, '12,.0f'):>12} {cell(ratio, '8.2f'):>8} "
            f"{cell(mfu, '7.1%'):>7} {cell(acc, '9.4f'):>9}"
        )
    total = sum(results[s]["seconds"] for s in stages)
    lines.append(f"pretrain + finetune + evaluate: {total:.0f} s")
    print("\n".join(lines))
    print(json.dumps(results, default=float))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.txt").write_text("\n".join(lines) + "\n")
    (out / "gpu_check.json").write_text(json.dumps(results, default=float, indent=2) + "\n")


if __name__ == "__main__":
    main()
