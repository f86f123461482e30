"""Profiles (profiles/*.yaml) are checked against params.yaml, and the GPU check script runs end to end."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from tgm.errors import UserError
from tgm.orchestrate import parse_overrides
from tgm.profiles import apply, dvc_arguments, overrides


def test_the_gpu_profile_is_valid_params_and_becomes_dvc_set_arguments():
    profile = ROOT / "profiles/gpu.yaml"
    p = apply(profile, ROOT / "params.yaml")
    assert p.prepare.image_size == 28 and p.model.n_embd == 512
    args = dvc_arguments(profile, ROOT / "params.yaml")
    assert args[::2] == ["-S"] * len(overrides(profile))
    assert parse_overrides(args[1::2]) == overrides(profile)  # what DVC reads back is what the profile says


def test_the_fashion_profile_is_valid_params_and_its_arguments_survive_the_makefiles_shell():
    profile = ROOT / "profiles/fashion.yaml"
    p = apply(profile, ROOT / "params.yaml")
    assert p.ingest.source == "builtin:fashion-mnist" and p.study.per_class == (10, 100)
    printed = subprocess.run(
        [sys.executable, "-m", "tgm.profiles", str(profile)], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    # What `args=$(...) && dvc exp run $args` hands DVC: the words of the line, re-read as DVC reads -S values.
    words = printed.split()
    assert words[::2] == ["-S"] * len(overrides(profile))
    assert parse_overrides(words[1::2]) == overrides(profile)


@pytest.mark.parametrize(
    "text, message",
    [("model:\n  n_layers: 8\n", "model.n_layers is not a key"), ("model:\n  n_head: 3\n", "divisible")],
)
def test_a_bad_profile_is_refused_before_dvc_runs(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        dvc_arguments(tmp_path / "bad.yaml", ROOT / "params.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "tgm.profiles", str(tmp_path / "bad.yaml")], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode != 0 and message in proc.stderr and not proc.stdout


@pytest.mark.slow
def test_the_gpu_check_script_runs_the_three_stages_and_prints_its_table(tmp_path):
    script = [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--quick"]
    subprocess.run(
        [*script, "--prepare", str(tmp_path / "data"), "--source", "builtin:digits"],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    proc = subprocess.run(
        [*script, "--prepared", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--seconds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "out/gpu_check.txt").read_text()
    assert all(row in table for row in ("benchmark step, eager", "pretrain", "finetune", "evaluate"))
    results = json.loads((tmp_path / "out/gpu_check.json").read_text())
    assert 0 <= results["evaluate"]["metrics"]["accuracy"] <= 1 and results["pretrain"]["tokens_per_s"] > 0
