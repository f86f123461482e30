"""The GPU paths of training, where a CUDA device exists (skipped with the reason elsewhere): data held on the
device, pinned asynchronous copies, fused AdamW, checkpoints snapshotted from device memory, and the one-table
device check of benchmarks/gpu_check.py as a user runs it."""

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, params_of
from test_train import toy_data

from tgm.model import TGM, TGMConfig
from tgm.tokens import TokenFile
from tgm.training.checkpoint import Checkpoints, snapshot
from tgm.training.data import Batches, Split
from tgm.training.device import seed_everything, to_device
from tgm.training.loop import fit
from tgm.training.objectives import Classify
from tgm.training.optim import make_optimizer

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda", 0) if torch.cuda.is_available() else None


def model() -> TGM:
    seed_everything(0)
    return TGM(TGMConfig(palette_size=4, seq_len=16, n_layer=1, n_head=2, n_embd=16, n_classes=2)).to(CUDA)


def test_a_small_split_is_held_on_the_device_and_batches_are_made_there(tmp_path):
    np.save(tmp_path / "train.npy", toy_data()[0].astype(np.uint8))
    train = Split(TokenFile(tmp_path / "train.npy"), toy_data()[1])
    batches = Batches(train, toy_data(40, seed=5)[0], params_of("finetune", batch_size=16, augment_shift=1), CUDA)
    assert batches.data_device == CUDA and batches.tokens.device.type == "cuda" and batches.pool.is_cuda

    class State:
        batch, epoch_order_rng = 0, None

    x, y = batches.batch(batches.epoch_order(State()), 0)
    assert x.is_cuda and y.is_cuda and len(x) == 32  # 16 labelled + 16 pooled


def test_a_host_tensor_reaches_the_device_through_pinned_memory_unchanged():
    host = torch.arange(1000, dtype=torch.int64)
    moved = to_device(host, CUDA)
    torch.cuda.synchronize()
    assert moved.is_cuda and torch.equal(moved.cpu(), host)


def test_adamw_is_fused_when_every_parameter_is_on_the_gpu():
    opt = make_optimizer(model(), params_of("finetune"))
    assert opt.defaults["fused"] is True


def test_a_snapshot_of_device_tensors_is_a_pinned_copy_later_steps_cannot_change():
    weights = torch.ones(1000, device=CUDA)
    copy = snapshot({"w": weights})["w"]
    torch.cuda.current_stream(CUDA).synchronize()
    weights.add_(1)  # the next step
    assert copy.is_pinned() and torch.equal(copy, torch.ones(1000))


def test_training_on_the_gpu_learns_and_its_background_checkpoint_holds_its_step(tmp_path):
    class Keeps(Checkpoints):
        first = None

        def write(self, state):
            time.sleep(0.3)  # training goes on meanwhile
            super().write(state)
            if self.first is None:
                self.first = {k: v.clone() for k, v in state["model"].items()}

    params = params_of("finetune", epochs=3, batch_size=8, lr=0.01, checkpoint_every=2, augment_shift=1)
    keeps = Keeps(tmp_path, "fp", 2, CUDA)
    history, _ = fit(model(), Split(*toy_data()), Split(*toy_data(32, seed=1)), params, Classify(0.5), CUDA,
                     checkpoints=keeps)  # fmt: skip
    assert max(r["val_accuracy"] for r in history) >= 0.9
    at_step_2 = model()
    fit(at_step_2, Split(*toy_data()), None, params_of("finetune", epochs=3, batch_size=8, lr=0.01, checkpoint_every=0,
        augment_shift=1, max_steps=2), Classify(0.5), CUDA)  # fmt: skip
    for k, v in at_step_2.state_dict().items():
        torch.testing.assert_close(keeps.first[k], v.cpu(), atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_the_gpu_check_runs_the_gpu_profile_and_prints_its_table(tmp_path):
    script = [sys.executable, str(ROOT / "benchmarks/gpu_check.py")]
    subprocess.run([*script, "--prepare", str(tmp_path / "data")], check=True, cwd=ROOT, capture_output=True)
    proc = subprocess.run(
        [*script, "--prepared", str(tmp_path / "data"), "--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "benchmark step, compile" in proc.stdout and "pretrain" in proc.stdout
