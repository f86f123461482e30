"""Shared fixtures. The slow ones build a real DVC project in a temporary git repository and run the real
pipeline on scikit-learn's 8x8 digits with tiny params, once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tgm.params import load_params, replace

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

for key, value in {
    "DVC_NO_ANALYTICS": "1",
    "BENTOML_DO_NOT_TRACK": "True",
    "GX_ANALYTICS_ENABLED": "False",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(key, value)
# Under `pytest -n N` (make test) N workers share the cores: each worker's torch, and the stages it starts,
# use its share of them instead of every core each (oversubscribed torch threads slow everything down).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(share))
# Stage commands (`tgm ...`) and `dvc` must come from the interpreter running the tests.
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"

# params.yaml is the one source of defaults; tests change what they need through `params_of`.
DEFAULTS = load_params(ROOT / "params.yaml")


def params_of(group: str, **changes):
    """params.yaml's group `group` with `changes`, checked like the file."""
    return replace(getattr(DEFAULTS, group), name=group, **changes)


# Small enough to run the whole pipeline in well under a minute on 2 CPU cores.
TINY_PARAMS = {
    "ingest": {"source": "builtin:digits"},
    "prepare": {"image_size": 8, "palette_size": 8},
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32},
    "pretrain": {"epochs": 4, "batch_size": 32, "lr": 0.005},
    "finetune": {"epochs": 12, "batch_size": 32, "lr": 0.005},
    "study": {
        "fractions": [0.05, 0.2],
        "subsets": 2,
        "steps": 6,
        "scratch_steps": 6,
        "finetune_lrs": [0.005],
        "scratch_lrs": [0.005],
        "probe_C": [0.1, 1.0],
        "svm_C": [1.0, 10.0],
        "svm_gamma_scale": [1.0],
    },
    "evaluate": {"completion_images": 2, "completion_samples": 2, "ood_images": 200},
    # No champion comparison here: tests change params freely; tests/test_champion.py switches it on.
    "gate": {"min_accuracy": 0.0, "min_macro_f1": 0.0, "max_regression": None},
}
PROJECT_FILES = [
    ".gitignore",  # as in a clone: Python's caches, written when stages and servers import tgm/, stay untracked
    "dvc.yaml",
    "params.yaml",
    "bentofile.yaml",
    "constraints.txt",
    "pyproject.toml",
    "tgm",
    "flows",
    "data/sources",
    "bases",
]


def run(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def merge(base: dict, overrides: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for group, values in overrides.items():
        out.setdefault(group, {}).update(values)
    return out


def make_project(dest: Path, overrides: dict) -> Path:
    """A fresh git + DVC repository holding this project's pipeline, with params overridden."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in PROJECT_FILES:
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(merge(params, overrides), sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "test@t-gm.invalid"], dest)
    run(["git", "config", "user.name", "T-GM tests"], dest)
    run(["dvc", "init", "-q"], dest)
    shutil.copy2(ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "project"], dest)
    return dest


def set_param(project: Path, group: str, key: str, value):
    """Set params.yaml's group.key in `project`; returns the old value."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    old = params[group].get(key)
    params[group][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return old


def commit_all(project: Path, message: str) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "--allow-empty", "-m", message], project)


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("bentoml_home")
    os.environ["BENTOML_HOME"] = str(home)
    return home


def tree_digest(root: Path) -> dict[str, str]:
    """path -> sha256 of every file under `root`, but DVC's scratch folder (.dvc/tmp) and Python's caches."""
    import hashlib

    digests = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not path.is_symlink() and not rel.startswith(".dvc/tmp") and "__pycache__" not in rel:
            digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def build_shared_project(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny pipeline reproduced once for the whole run, in every worker's view: (project, its BentoML home).
    Under `pytest -n N` the workers share one build (the first to take the lock makes it, the others wait),
    since each build is a full `dvc repro` that would otherwise run once per worker."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    shared, done = root / "digits-shared", root / "digits-shared.done"
    with FileLock(str(root / "digits-shared.lock")):
        if not done.exists():
            shutil.rmtree(shared, ignore_errors=True)  # a build that failed in another worker
            project, home = make_project(shared / "project", TINY_PARAMS), shared / "bentoml_home"
            home.mkdir()
            run(["dvc", "repro"], project, timeout=900, env={**os.environ, "BENTOML_HOME": str(home)})
            commit_all(project, "first run")
            done.touch()
    return shared / "project", shared / "bentoml_home"


@pytest.fixture(scope="session")
def built_project(tmp_path_factory, bentoml_home) -> Path:
    """The whole pipeline reproduced once on builtin:digits, committed, its model packaged (and copied into
    `bentoml_home`). Read it, never change it: a test that runs DVC, the flow or the gate on a project takes
    `digits_project`. When the session ends, every file must be as the first run left it."""
    project, home = build_shared_project(tmp_path_factory)
    shutil.copytree(home, bentoml_home, symlinks=True, dirs_exist_ok=True)
    before = tree_digest(project)
    yield project
    after = tree_digest(project)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test changed the shared read-only project (use digits_project): {changed[:10]}"


# The test files that take longest, longest first (`make test PYTEST_ARGS=--durations=0`, summed per file).
SLOWEST_FILES = (
    "test_pipeline_e2e.py",
    "test_prefect_server.py",
    "test_train_scale.py",
    "test_fresh_machine.py",
    "test_pools_and_bases.py",
    "test_champion.py",
    "test_flow.py",
    "test_service_errors.py",
    "test_dvc_remote.py",
    "test_data_stages.py",
    "test_train.py",
    "test_profiles.py",
    "test_service.py",
    "test_drift.py",
)


def schedule(items) -> None:
    """Order the files for `make test`'s workers (xdist hands them out in collection order, Makefile's
    --no-loadscope-reorder): the slowest file that needs the shared project first, so one worker starts its
    build at once; then the files that need no project, which keep the other worker busy meanwhile; then the
    other project files. Within each group the slowest go first, so that the run does not end on a long file."""

    def rank(item) -> int:
        name = item.path.name
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)

    needs = {item.path for item in items if "built_project" in item.fixturenames}
    first = min((item for item in items if item.path in needs), key=rank, default=None)

    def group(item) -> tuple[int, int]:
        if first is not None and item.path == first.path:
            return 0, 0
        return (2 if item.path in needs else 1), rank(item)

    items.sort(key=group)  # stable: each file's tests stay together and in their order


def pytest_collection_modifyitems(config, items):
    import torch

    schedule(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here); run where one is, e.g. the lent GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def copy_project(src: Path, dest: Path) -> None:
    """A copy of a project, git history and DVC cache and all, but .dvc/tmp: DVC's locks and file-hash cache of
    the original; the copy builds its own."""
    shutil.copytree(src, dest, symlinks=True, ignore=lambda d, _: {"tmp"} if d.endswith(".dvc") else set())


@pytest.fixture
def digits_project(built_project, bentoml_home, tmp_path, monkeypatch) -> Path:
    """A private copy of the built project (git history, DVC cache and all) and of its BentoML store, so that
    each test starts from the same state whatever ran before it, in any order."""
    project = tmp_path / "project"
    copy_project(built_project, project)
    home = tmp_path / "bentoml_home"
    shutil.copytree(bentoml_home, home, symlinks=True)
    monkeypatch.setenv("BENTOML_HOME", str(home))
    return project
