"""Training at scale and under failure: gradient accumulation, DDP under torchrun, crash-safe resume."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BIN, copy_project, merge, params_of
from safetensors.torch import load_file
from test_train import toy_data

from tgm.errors import TrainingDiverged
from tgm.model import TGM, TGMConfig
from tgm.params import TrainParams
from tgm.training.checkpoint import Checkpoints
from tgm.training.data import Split, shift_images
from tgm.training.device import seed_everything
from tgm.training.loop import fit
from tgm.training.objectives import Classify, Generative

CPU = torch.device("cpu")


def toy_fit(params: TrainParams, checkpoints=None):
    seed_everything(0)
    model = TGM(TGMConfig(palette_size=4, seq_len=16, n_layer=1, n_head=2, n_embd=16, n_classes=2))
    train, val = Split(*toy_data()), Split(*toy_data(32, seed=1))
    history, _ = fit(model, train, val, params, Classify(0.5), CPU, checkpoints=checkpoints)
    return model, history


def test_gradient_accumulation_matches_the_full_batch():
    # 64 images in batches of 24: the last batch (16) splits unevenly, which the weighting must handle.
    # fp32: in bf16 the rounding of different micro-batch shapes alone exceeds the tolerance.
    full, _ = toy_fit(
        params_of("pretrain", epochs=2, batch_size=24, lr=0.01, patience=5, precision="fp32", augment_shift=1)
    )
    accum, _ = toy_fit(
        params_of(
            "pretrain", epochs=2, batch_size=24, lr=0.01, patience=5, grad_accum=3, precision="fp32", augment_shift=1
        )
    )
    for (k, a), (_, b) in zip(full.state_dict().items(), accum.state_dict().items()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=k)


def test_shift_keeps_the_image_and_fills_with_the_corner():
    tokens = torch.arange(16).view(1, 16) + 1
    tokens[0, 0] = 0
    gen = torch.Generator().manual_seed(0)
    shifted = [shift_images(tokens, 1, gen) for _ in range(20)]
    assert any(not torch.equal(s, tokens) for s in shifted)
    for s in shifted:
        assert set(s.flatten().tolist()) <= set(tokens.flatten().tolist())  # nothing new but the fill (0)


class CrashAfter(Checkpoints):
    """Dies like a killed process right after its n-th checkpoint reached the disk."""

    def __init__(self, *args, crash_after: int):
        super().__init__(*args, CPU)
        self.left = crash_after

    def write(self, state):
        super().write(state)
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt("simulated crash")


def test_resume_after_a_crash_ends_with_the_same_weights(tmp_path):
    params = params_of(
        "pretrain",
        epochs=4,
        batch_size=8,
        lr=0.01,
        patience=10,
        checkpoint_every=3,
        augment_shift=1,
        grad_accum=2,
    )
    reference, ref_history = toy_fit(params)
    with pytest.raises(KeyboardInterrupt):
        toy_fit(params, CrashAfter(tmp_path, "fp", 3, crash_after=4))  # mid-epoch 2
    resumed, history = toy_fit(params, Checkpoints(tmp_path, "fp", 3, CPU))
    assert history == ref_history
    for (k, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_loss_that_becomes_nan_stops_training_saying_what_to_do():
    seed_everything(0)
    model = TGM(TGMConfig(palette_size=4, seq_len=16, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    params = params_of("pretrain", epochs=3, batch_size=16)
    with pytest.raises(TrainingDiverged, match="validation loss became nan in epoch 1; training diverged, lower"):
        fit(model, Split(*toy_data()), Split(*toy_data(32, seed=1)), params, Generative(), CPU)


# --- real processes on the prepared digits data ---------------------------------------------------------


def stage_dir(tmp_path: Path, digits_project: Path, pretrain: dict, stage: str = "pretrain") -> Path:
    """A folder to run one training stage in: the prepared data (and, for finetune, the pretrained model)."""
    work = tmp_path / "work"
    shutil.copytree(digits_project / "data" / "prepared", work / "data" / "prepared")
    if stage == "finetune":
        shutil.copytree(digits_project / "models" / "pretrained", work / "models" / "pretrained")
    params = merge(yaml.safe_load((digits_project / "params.yaml").read_text()), {stage: pretrain})
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work


def killed_after_a_checkpoint(work: Path, cmd: list[str], stage: str = "pretrain") -> None:
    """Start `cmd` in `work` and kill -9 it, with every process it started, once a checkpoint is on disk."""
    checkpoint = work / "checkpoints" / stage / "checkpoint.pt"
    import psutil

    proc = subprocess.Popen(cmd, cwd=work, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # torchrun's workers are its children, in sessions of their own: each is killed, not only the launcher.
    family = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "the run ended before writing a checkpoint"
    out = "pretrained" if stage == "pretrain" else "classifier"
    assert not (work / "models" / out).exists()  # nothing half-written


def outputs_of(work: Path, stage: str) -> tuple[dict, dict]:
    out = "pretrained" if stage == "pretrain" else "classifier"
    return (
        json.loads((work / "metrics" / f"{stage}.json").read_text()),
        load_file(str(work / "models" / out / "model.safetensors")),
    )


TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "tgm"]


@pytest.mark.slow
@pytest.mark.parametrize("stage, launcher", [("pretrain", TORCHRUN)])
def test_a_killed_stage_resumes_to_the_result_of_a_run_that_never_stopped(tmp_path, digits_project, stage, launcher):
    """pretrain under torchrun with 2 processes (DDP): killed with -9 after a checkpoint, the same command again
    ends with the metrics and weights of an uninterrupted run. (finetune, one process, through `dvc repro`:
    the test below.)"""
    settings = {"epochs": 4, "batch_size": 16, "checkpoint_every": 5, "precision": "fp32"}
    steady = stage_dir(tmp_path / "steady", digits_project, settings, stage)
    crashy = stage_dir(tmp_path / "crashy", digits_project, settings, stage)
    subprocess.run([*launcher, stage], cwd=steady, env=env(), check=True, capture_output=True, timeout=600)
    killed_after_a_checkpoint(crashy, [*launcher, stage], stage)
    again = subprocess.run([*launcher, stage], cwd=crashy, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    (m1, w1), (m2, w2) = outputs_of(steady, stage), outputs_of(crashy, stage)
    assert m1 == m2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.slow
def test_a_killed_dvc_repro_resumes_to_the_live_curves_of_a_run_that_never_stopped(tmp_path, digits_project):
    """finetune through DVC, as users run it, killed with -9 after a checkpoint: the second `dvc repro` ends
    with the metrics, weights and live curves of a run that was never killed. `dvc repro` removes a stage's
    outputs before it runs, so the live curves are `persist: true` in dvc.yaml; without that the resumed run
    drew only the steps after its checkpoint."""
    # The first checkpoint (step 100) comes after epoch 1 (about 80 steps): the killed run has drawn points.
    settings = {"epochs": 3, "batch_size": 16, "checkpoint_every": 100, "precision": "fp32"}
    steady, crashy = digits_project, tmp_path / "crashy"
    copy_project(steady, crashy)
    for project in (steady, crashy):
        params = merge(yaml.safe_load((project / "params.yaml").read_text()), {"finetune": settings})
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repro = [str(BIN / "dvc"), "repro", "--single-item", "finetune"]
    subprocess.run(repro, cwd=steady, env=env(), check=True, capture_output=True, timeout=600)
    killed_after_a_checkpoint(crashy, repro, "finetune")
    assert len((crashy / "dvclive/finetune/plots/metrics/epoch.tsv").read_text().splitlines()) > 1
    again = subprocess.run(repro, cwd=crashy, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout + again.stderr

    def live_curves(project: Path) -> dict[str, str]:
        return {p.relative_to(project).as_posix(): p.read_text() for p in (project / "dvclive").rglob("*.*")}

    assert live_curves(steady) and live_curves(crashy) == live_curves(steady)
    (m1, w1), (m2, w2) = outputs_of(steady, "finetune"), outputs_of(crashy, "finetune")
    assert m1 == m2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.slow
def test_a_checkpoint_of_other_params_is_not_resumed(tmp_path, digits_project):
    """A run killed with one learning rate, then started with another: the checkpoint's fingerprint differs,
    so the second starts afresh and ends exactly as a clean run with the new rate."""
    settings = {"epochs": 4, "batch_size": 16, "checkpoint_every": 5}
    crashy = stage_dir(tmp_path / "crashy", digits_project, settings)
    killed_after_a_checkpoint(crashy, [str(BIN / "tgm"), "pretrain"])
    changed = {**settings, "lr": 0.002}
    params = merge(yaml.safe_load((crashy / "params.yaml").read_text()), {"pretrain": changed})
    (crashy / "params.yaml").write_text(yaml.safe_dump(params))
    again = subprocess.run([str(BIN / "tgm"), "pretrain"], cwd=crashy, env=env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "belongs to other params or data" in again.stderr and "resuming from" not in again.stderr
    clean = stage_dir(tmp_path / "clean", digits_project, changed)
    subprocess.run([str(BIN / "tgm"), "pretrain"], cwd=clean, env=env(), check=True, capture_output=True)
    (m1, w1), (m2, w2) = outputs_of(clean, "pretrain"), outputs_of(crashy, "pretrain")
    assert m1 == m2 and all(torch.equal(w1[k], w2[k]) for k in w1)


def env() -> dict:
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def outputs(work: Path) -> tuple[dict, dict]:
    return (
        json.loads((work / "metrics" / "pretrain.json").read_text()),
        load_file(str(work / "models" / "pretrained" / "model.safetensors")),
    )


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, digits_project):
    settings = {"epochs": 2, "batch_size": 32, "checkpoint_every": 0, "precision": "fp32"}
    single = stage_dir(tmp_path / "one", digits_project, settings)
    double = stage_dir(tmp_path / "two", digits_project, settings)
    subprocess.run([str(BIN / "tgm"), "pretrain"], cwd=single, env=env(), check=True, capture_output=True)
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "tgm", "pretrain"],
        cwd=double,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 process(es)" in proc.stderr
    (m1, w1), (m2, w2) = outputs(single), outputs(double)
    # Same global batch, same data order: only the order of floating-point sums differs.
    assert m2["val_bpp"] == pytest.approx(m1["val_bpp"], abs=1e-3)
    assert m2["best_epoch"] == m1["best_epoch"]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-3, rtol=1e-3, msg=k)


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_to_the_same_result(tmp_path, digits_project):
    settings = {"epochs": 6, "batch_size": 16, "checkpoint_every": 5}
    steady = stage_dir(tmp_path / "steady", digits_project, settings)
    crashy = stage_dir(tmp_path / "crashy", digits_project, settings)
    subprocess.run([str(BIN / "tgm"), "pretrain"], cwd=steady, env=env(), check=True, capture_output=True)

    checkpoint = crashy / "checkpoints" / "pretrain" / "checkpoint.pt"
    proc = subprocess.Popen(
        [str(BIN / "tgm"), "pretrain"], cwd=crashy, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "the run ended before writing a checkpoint"
    assert not (crashy / "models" / "pretrained").exists()  # nothing half-written

    again = subprocess.run([str(BIN / "tgm"), "pretrain"], cwd=crashy, env=env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    (m1, w1), (m2, w2) = outputs(steady), outputs(crashy)
    assert m1 == m2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not checkpoint.exists()  # a finished run cleans up after itself
    # The live curves too: the steps between the checkpoint and the kill are logged once, not twice.
    for curve in ("train/loss.tsv", "val/bpp.tsv", "epoch.tsv"):
        live = Path("dvclive/pretrain/plots/metrics") / curve
        assert (crashy / live).read_text() == (steady / live).read_text(), curve


def test_shifting_a_batch_at_once_equals_shifting_each_image():
    """The batched shift (one gather, on any device) against the plain per-image crop it replaced."""

    def one_by_one(tokens, k, gen):
        B, T = tokens.shape
        S = int(T**0.5)
        grid = tokens.view(B, S, S)
        fill = grid[:, :1, :1].expand(B, S + 2 * k, S + 2 * k).clone()
        fill[:, k : k + S, k : k + S] = grid
        offsets = torch.randint(0, 2 * k + 1, (B, 2), generator=gen).tolist()
        return torch.stack([fill[b, dy : dy + S, dx : dx + S] for b, (dy, dx) in enumerate(offsets)]).reshape(B, T)

    tokens = torch.randint(0, 16, (33, 49), generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 3):
        expected = one_by_one(tokens, k, torch.Generator().manual_seed(k))
        assert torch.equal(shift_images(tokens, k, torch.Generator().manual_seed(k)), expected), k


class SlowToWrite(Checkpoints):
    """Keeps the first checkpoint it is given, after taking long enough to write it that training has moved on."""

    def __init__(self, *args):
        super().__init__(*args, CPU)
        self.first = None

    def write(self, state):
        time.sleep(0.5)
        super().write(state)
        if self.first is None:
            self.first = {k: v.clone() for k, v in state["model"].items()}


def test_a_checkpoint_written_in_the_background_holds_the_weights_of_its_step(tmp_path):
    """Training goes on while a checkpoint is written: the file must still be the state at the step it was
    taken (2), not the weights of the steps trained while it was being written."""
    base = {"epochs": 2, "batch_size": 8, "lr": 0.01, "patience": 10, "augment_shift": 1}
    slow = SlowToWrite(tmp_path, "fp", 2)
    _, history = toy_fit(params_of("pretrain", checkpoint_every=2, **base), slow)
    assert len(history) == 2  # steps 3 and 4 ran while step 2's checkpoint was written; step 4's waited for it
    at_step_2, _ = toy_fit(params_of("pretrain", checkpoint_every=0, max_steps=2, **base))
    for k, v in at_step_2.state_dict().items():
        assert torch.equal(slow.first[k], v), k


class FailsToWrite(Checkpoints):
    def write(self, state):
        raise OSError(28, "No space left on device")


def test_a_checkpoint_that_cannot_be_written_stops_training_with_the_disk_error(tmp_path):
    with pytest.raises(OSError, match="No space left"):
        toy_fit(params_of("pretrain", epochs=2, batch_size=8, checkpoint_every=3), FailsToWrite(tmp_path, "fp", 3, CPU))
