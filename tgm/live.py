"""Live training curves with dvclive, DVC's own logger: written while a stage runs, not after it ends.

`pretrain` and `finetune` write dvclive/<stage>/: the training loss every LOG_EVERY optimizer steps and the
validation metrics at the end of each epoch, all against the optimizer step. dvc.yaml declares metrics.json
(latest values and `step`: a column of `dvc exp show`) and plots/metrics/ (curves for `dvc plots`, the VS Code
extension and DVC Studio while `dvc exp run` is going). Today's per-epoch files (metrics/*.json,
plots/*_curve.csv) stay as they are; these curves are the step-level view next to them.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

LOG_EVERY = 10  # optimizer steps per point of the training-loss curve: fine enough to see, small to store
EPOCH_KEYS = {  # fit's per-epoch row -> the curve it feeds
    "val_loss": "val/loss",
    "val_bpp": "val/bpp",
    "val_accuracy": "val/accuracy",
    "val_cls_loss": "val/cls_loss",
    "lr": "train/lr",
}


def _open(directory: str | Path, resume: bool):
    from dvclive import Live

    # No dvc.yaml of its own (ours declares these files), no report, and no experiment of its own: inside
    # `dvc repro` / `dvc exp run` DVC records the run; a stage run by hand must not create experiments.
    return Live(str(directory), resume=resume, report=None, save_dvc_exp=False, dvcyaml=None)


def _drop_after(plots_dir: Path, step: int) -> None:
    """Forget points logged after `step`: a run resumed from its checkpoint logs those steps again."""
    for tsv in plots_dir.glob("**/*.tsv"):
        with tsv.open(newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows or "step" not in rows[0]:
            continue
        at = rows[0].index("step")
        kept = [rows[0]] + [r for r in rows[1:] if int(r[at]) <= step]
        with tsv.open("w", newline="") as f:
            csv.writer(f, delimiter="\t", lineterminator="\n").writerows(kept)


class LiveCurves:
    """One training run's curves in `directory`: each point of the training loss averages LOG_EVERY steps.

    The loss summed since the last point lives in the run's progress (`curve_loss`), which checkpoints keep: a
    run resumed after a crash draws exactly the curve of a run that never stopped.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.live = None

    def start(self, step: int) -> None:
        """Begin at optimizer step `step`: 0 for a new run (earlier curves are removed), else a resumed one."""
        self.live = _open(self.directory, resume=step > 0)
        if step > 0:
            _drop_after(self.directory / "plots", step)

    def point(self, progress) -> None:
        """Every LOG_EVERY optimizer steps: the mean of the training loss summed in `progress.curve_loss`."""
        self._flush(progress)

    def _flush(self, progress) -> None:
        total, images = progress.curve_loss
        if images == 0:
            return
        progress.curve_loss = (0.0, 0)
        self.live.step = progress.step
        self.live.log_metric("train/loss", total / images)
        self.live.make_summary()

    def epoch(self, progress, row: dict) -> None:
        """The end of an epoch: the rest of the training loss, then its validation metrics, at this step."""
        self._flush(progress)
        self._log_row(progress.step, row)

    def untrained(self, row: dict) -> None:
        """A run of no training step (pretrain straight from a base): its one validation row, at step 0."""
        self.start(0)
        self._log_row(0, row)

    def _log_row(self, step: int, row: dict) -> None:
        self.live.step = step
        self.live.log_metric("epoch", row["epoch"])
        for key, name in EPOCH_KEYS.items():
            if row.get(key) is not None and math.isfinite(row[key]):
                self.live.log_metric(name, row[key])
        self.live.make_summary()
