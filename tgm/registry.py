"""The champion registry: which model serves each task, kept in registry/ and versioned by DVC.

A *task* is what a classifier is for: its data source and class names (or an explicit `champion.task`). Each task
has at most one champion, the model that new models are gated against and that `bentoml serve` serves. The
registry is a folder that every clone gets with `dvc pull`:

    registry/champions.json                      every task: its champion, earlier champions, a log of events
    registry/models/<task>/<name>-<version>.bentomodel   each promoted model, exported from the BentoML store

`registry/` is the output of the `promote` stage (persistent, so promotions accumulate), so `dvc push` ships it
and `dvc pull` restores it. A champion's model is imported into the local BentoML store when it is first needed
there, so a fresh clone serves it without retraining. Promotions and rollbacks by hand (`tgm champion ...`) are
recorded in dvc.lock with `dvc commit promote`, then committed and pushed like any other change.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tgm.errors import UserError
from tgm.git import git_commit
from tgm.io import read_json, write_json
from tgm.store import MODEL_FILE, ensure_model, find_model, packaged_model

log = logging.getLogger(__name__)

REGISTRY = Path("registry")
INDEX = "champions.json"
# What the registry keeps of a model's evaluation: what the gate compares, and what a person reads first.
KEPT_METRICS = ("accuracy", "macro_f1", "test_bpp")


class RegistryError(UserError):
    """The registry cannot do what was asked (no champion to roll back to, an unknown model, ...)."""


@dataclass(frozen=True)
class Task:
    id: str
    source: str
    classes: tuple[str, ...]

    def describe(self) -> dict:
        return {"id": self.id, "source": self.source, "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        """The inverse of describe(): a task as reports/gate.json and the model's metadata record it."""
        return cls(d["id"], d["source"], tuple(d["classes"]))


def task_for(source: str, name: str | None, classifier_dir: str | Path = "models/classifier") -> Task:
    """The task of the classifier in `classifier_dir` (its class names are in its config.json)."""
    return task_of(source, read_json(Path(classifier_dir) / "config.json")["classes"], name)


def task_of(source: str, classes: list[str], name: str | None = None) -> Task:
    """The task a model with these classes, trained on `source`, belongs to; `name` (champion.task) overrides."""
    if name:
        return Task(name, source, tuple(classes))
    digest = hashlib.sha256("\n".join([source, *classes]).encode()).hexdigest()[:8]
    # A readable prefix for people; the digest is what tells two tasks apart (same source, other classes).
    slug = re.sub(r"[^a-z0-9]+", "-", source.lower()).strip("-")[-40:] or "task"
    return Task(f"{slug}-{digest}", source, tuple(classes))


def who() -> str:
    """The person promoting: git's user.name <user.email>, else the login name."""
    try:
        name = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True).stdout.strip()
        email = subprocess.run(["git", "config", "user.email"], capture_output=True, text=True).stdout.strip()
    except OSError:
        name = email = ""
    if name:
        return f"{name} <{email}>" if email else name
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def experiment() -> dict:
    """Which run made the model: the git commit, and the DVC experiment's name under `dvc exp run`."""
    return {"git_commit": git_commit(), "dvc_experiment": os.environ.get("DVC_EXP_NAME")}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Registry:
    """champions.json and the exported models beside it. Every change is written atomically."""

    def __init__(self, root: str | Path = REGISTRY):
        self.root = Path(root)
        self.index_path = self.root / INDEX
        self.data = {"latest": None, "tasks": {}}
        if self.index_path.exists():
            try:
                self.data = read_json(self.index_path)
            except ValueError as exc:
                raise RegistryError(
                    f"{self.index_path} is not valid JSON ({exc}); `dvc checkout registry` restores the recorded one"
                ) from None

    def champion(self, task_id: str) -> dict | None:
        return self.data["tasks"].get(task_id, {}).get("champion")

    def tasks(self) -> dict[str, dict]:
        return self.data["tasks"]

    def save(self) -> None:
        write_json(self.index_path, self.data)

    def promote(self, model_tag: str, task: Task, metrics: dict, how: str) -> dict:
        """Make `model_tag` (in the local BentoML store) `task`'s champion; the old one can be rolled back to."""
        import bentoml

        model = bentoml.models.get(model_tag)
        entry = self.data["tasks"].setdefault(task.id, {**task.describe(), "champion": None, "earlier": [], "log": []})
        if entry["champion"] and entry["champion"]["model"] == str(model.tag):
            log.info("registry: %s is already the champion of %s", model.tag, task.id)
            return entry["champion"]
        rel = Path("models") / task.id / f"{model.tag.name}-{model.tag.version}.bentomodel"
        if not (self.root / rel).exists():
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            # Exported next to its final name, then renamed: a killed export leaves no half-written model.
            tmp = self.root / rel.with_suffix(".partial.bentomodel")
            bentoml.models.export_model(model.tag, str(tmp.resolve()))
            os.replace(tmp, self.root / rel)
        champion = {
            "model": str(model.tag),
            "file": rel.as_posix(),
            "metrics": {
                **{k: metrics[k] for k in KEPT_METRICS if k in metrics},
                "svm_rbf_accuracy": metrics.get("reference", {}).get("svm_rbf_accuracy"),
            },
            "promoted_by": who(),
            "promoted_at": _now(),
            "experiment": experiment(),
            "how": how,
        }
        if entry["champion"]:
            entry["earlier"].append(entry["champion"])
        entry["champion"] = champion
        entry["log"].append({"event": "promote", **{k: champion[k] for k in ("model", "promoted_by", "promoted_at")}})
        self.data["latest"] = task.id
        self.save()
        log.info("registry: %s is now the champion of task %s", model.tag, task.id)
        return champion

    def rollback(self, task_id: str | None = None) -> dict:
        """Make the previous champion of `task_id` (default: the latest task) the champion again."""
        task_id = task_id or self.data.get("latest")
        entry = self.data["tasks"].get(task_id or "")
        if entry is None:
            known = ", ".join(self.data["tasks"]) or "none"
            raise RegistryError(f"no task {task_id!r} in {self.index_path} (tasks: {known})")
        if not entry["earlier"]:
            raise RegistryError(f"task {task_id} has no earlier champion to roll back to")
        dropped, entry["champion"] = entry["champion"], entry["earlier"].pop()
        event = {"event": "rollback", "model": entry["champion"]["model"], "replaced": dropped["model"]}
        entry["log"].append({**event, "promoted_by": who(), "promoted_at": _now()})
        self.data["latest"] = task_id
        self.save()
        log.info("registry: rolled task %s back from %s to %s", task_id, dropped["model"], entry["champion"]["model"])
        return entry["champion"]

    def ensure_in_store(self, champion: dict) -> str:
        """The champion's model tag, imported into the local BentoML store from its export if it is not there."""
        return ensure_model(champion["model"], self.root / champion["file"])


def served_model(root: str | Path = REGISTRY, task_id: str | None = None) -> str | None:
    """The tag `bentoml serve` in a project should serve: the champion of TGM_TASK, else of the task promoted
    last; before any promotion, the model `package` wrote in this project; None when there is neither. Either
    is imported into the local BentoML store first if it is not there."""
    registry = Registry(root)
    task_id = task_id or registry.data.get("latest")
    champion = registry.champion(task_id) if task_id else None
    if champion:
        return registry.ensure_in_store(champion)
    if task_id is None and (packaged := packaged_model()) is not None:
        return ensure_model(*packaged)
    return None


def promote(
    *,
    packaged_dir: str | Path,
    package_report: str | Path,
    gate_report: str | Path,
    metrics_path: str | Path,
    root: str | Path,
) -> dict:
    """The `promote` stage: the model `package` just saved, which passed the gate, becomes its task's champion."""
    gate = read_json(gate_report)
    if not gate.get("passed"):
        raise RegistryError(f"promote: {gate_report} says the gate failed; refusing to promote")
    # The task the gate judged the model for (and compared it within): the same task it is promoted in.
    task = Task.from_dict(gate["task"])
    tag = ensure_model(read_json(package_report)["model_tag"], Path(packaged_dir) / MODEL_FILE)
    return Registry(root).promote(tag, task, read_json(metrics_path), "pipeline")


def show(registry: Registry) -> str:
    if not registry.tasks():
        return f"no champion yet ({registry.index_path} is empty or missing; `dvc pull` fetches a shared one)"
    rows = []
    for task_id, entry in registry.tasks().items():
        c = entry["champion"] or {}
        mark = " (latest)" if task_id == registry.data.get("latest") else ""
        rows.append(
            f"{task_id}{mark}: {c.get('model', 'none')}  accuracy {c.get('metrics', {}).get('accuracy')}  "
            f"promoted {c.get('promoted_at')} by {c.get('promoted_by')} ({c.get('how')}); "
            f"{len(entry['earlier'])} earlier; classes {', '.join(entry['classes'])}; source {entry['source']}"
        )
    return "\n".join(rows)


def _record_in_dvc_lock() -> str:
    """`dvc commit promote`, so that dvc.lock (and so git and the DVC remote) carry the changed registry."""
    proc = subprocess.run(["dvc", "commit", "--force", "promote"], capture_output=True, text=True)
    if proc.returncode != 0:
        return (
            f"registry changed, but `dvc commit promote` failed ({proc.stderr.strip() or proc.stdout.strip()}); "
            "run it once the pipeline has run, then commit dvc.lock"
        )
    return "recorded in dvc.lock; share it with: git commit dvc.lock -m '...' && dvc push && git push"


def champion_command(action: str, model: str | None, task_id: str | None, root: str | Path = REGISTRY) -> str:
    """`tgm champion show|promote|rollback`: what to print."""
    registry = Registry(root)
    if action == "show":
        return show(registry)
    if action == "rollback":
        champion = registry.rollback(task_id)
        return f"{champion['model']} is the champion again; " + _record_in_dvc_lock()
    if not model:
        raise RegistryError("tgm champion promote needs a model tag, e.g. tgm-classifier:abc123")
    import bentoml

    info = bentoml.models.get(find_model(model)).info
    if info.labels.get("gate") != "passed" or "task" not in info.metadata:
        raise RegistryError(f"{model} was not packaged after passing the gate (`tgm package`); refusing to promote")
    task = Task.from_dict(info.metadata["task"])
    champion = registry.promote(model, task, info.metadata["metrics"], "by hand")
    return f"{champion['model']} is the champion of {task.id}; " + _record_in_dvc_lock()
