"""What Prefect adds to a pipeline run where every stage is already up to date.

    python benchmarks/prefect_overhead.py [--workdir .] [--rounds 3]

The project must be a git repository whose pipeline is up to date (after `make run`, say). Alternating
rounds of, each as a fresh process the way a user starts it:
  - bare `dvc repro`
  - `python -m flows.pipeline` against a running `prefect server start` (what a scheduled run sees)
  - `python -m flows.pipeline` with no server configured (Prefect starts a temporary one for the run)
Each flow run also saves its DVC experiment and its artifacts, as every flow run does; the experiments it
creates are removed at the end. Prints the median wall time of each and the flow's overhead over bare DVC.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import local_server  # noqa: E402

BIN = Path(sys.executable).parent


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=".", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    base = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "BENTOML_DO_NOT_TRACK": "True",
    }
    base.pop("PREFECT_API_URL", None)
    _, out = timed([str(BIN / "dvc"), "status"], workdir, base)
    if "up to date" not in out:
        raise SystemExit(f"{workdir} is not up to date (`dvc status`):\n{out[-2000:]}\nrun `dvc repro` first")
    before = set(
        subprocess.run(
            [str(BIN / "dvc"), "exp", "list", "--name-only"], cwd=workdir, env=base, capture_output=True, text=True
        ).stdout.split()
    )

    home = Path(tempfile.mkdtemp(prefix="tgm-prefect-bench-"))
    server, api, _ = local_server.start_prefect_server(home)
    flow = [sys.executable, "-m", "flows.pipeline", "--workdir", str(workdir)]
    ephemeral_home = Path(tempfile.mkdtemp(prefix="tgm-prefect-ephemeral-"))
    runs = {
        "dvc repro": ([str(BIN / "dvc"), "repro"], base),
        "flow, running server": (flow, {**base, "PREFECT_API_URL": api, "PREFECT_HOME": str(home)}),
        "flow, temporary server": (flow, {**base, "PREFECT_HOME": str(ephemeral_home)}),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    try:
        cmd, env = runs["flow, running server"]
        timed(cmd, workdir, env)  # warm-up: the first run against a fresh server registers the flow
        for _ in range(args.rounds):
            for name, (cmd, env) in runs.items():
                elapsed, out = timed(cmd, workdir, env)
                if name == "dvc repro" and "Running stage" in out:
                    raise SystemExit("`dvc repro` ran a stage: the project was not up to date")
                times[name].append(elapsed)
    finally:
        local_server.stop(server)
        after = set(
            subprocess.run(
                [str(BIN / "dvc"), "exp", "list", "--name-only"], cwd=workdir, env=base, capture_output=True, text=True
            ).stdout.split()
        )
        if after - before:
            subprocess.run(
                [str(BIN / "dvc"), "exp", "remove", *sorted(after - before)], cwd=workdir, env=base, capture_output=True
            )

    bare = statistics.median(times["dvc repro"])
    print(f"{'':24} {'median s':>9} {'rounds':>30} {'x bare':>7} {'added s':>8}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:24} {med:9.2f} {' '.join(f'{v:.2f}' for v in values):>30} {med / bare:7.2f} {med - bare:8.2f}")


if __name__ == "__main__":
    main()
