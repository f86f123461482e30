"""The champion of each task, kept by GTO as git tags: versions and stage assignments that travel with git.

A *task* is what a classifier is for: its data source and class names (or an explicit `gate.task`). Each task
is a GTO artifact named after its id. Promoting a model registers a version of it (`<task>@v0.0.N`) on a
*promotion commit* and assigns it the stage `champion` (`<task>#champion#N`). The promotion commit is a
snapshot of the project as the pipeline left it (dvc.lock with the packaged model's hash, metrics/, reports/),
parented on HEAD but on no branch: the tag keeps it, so a promotion needs no commit on your branch and two
clones never conflict over it. `git push --tags` shares it; `git fetch --tags` brings others' promotions.

What the registry keeps is then read back from git and DVC, never copied: the model's tag and metrics from the
promotion commit's reports/package.json and metrics/evaluate.json, who and when from the assignment's tag, the
model's bytes through `dvc.api` at that commit (the local DVC cache, else the remote). A rollback unassigns the
champion (`<task>#champion!#N`), so the champion before it, still assigned, is the champion again.

What GTO does not do, and this module does: name tasks, make the promotion commit, refuse to re-promote an
earlier champion automatically, and fill the local BentoML store from a champion's export.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tgm.errors import UserError
from tgm.io import read_json, write_json
from tgm.store import MODEL_FILE, PACKAGED, REPORT, ensure_model, packaged_model

log = logging.getLogger(__name__)

STAGE = "champion"
METRICS = "metrics/evaluate.json"
# What a champion shows of its evaluation: what the gate compares, and what a person reads first.
KEPT_METRICS = ("accuracy", "macro_f1", "test_bpp")
# GTO's artifact names: letters, digits, - and _ inside, a letter or digit at each end.
TASK_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]{0,62}[A-Za-z0-9])?$")


def kept_metrics(metrics: dict) -> dict:
    return {
        **{k: metrics[k] for k in KEPT_METRICS if k in metrics},
        "svm_rbf_accuracy": metrics.get("reference", {}).get("svm_rbf_accuracy"),
    }


class RegistryError(UserError):
    """The registry cannot do what was asked (no champion to roll back to, an unknown model, no git, ...)."""


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
    """The task a model with these classes, trained on `source`, belongs to; `name` (gate.task) overrides."""
    if name:
        if not TASK_NAME.match(name):
            raise RegistryError(
                f"gate.task {name!r} cannot name a GTO artifact: letters, digits, - and _ inside, a letter or "
                "digit at each end"
            )
        return Task(name, source, tuple(classes))
    digest = hashlib.sha256("\n".join([source, *classes]).encode()).hexdigest()[:8]
    # A readable prefix for people; the digest is what tells two tasks apart (same source, other classes).
    slug = re.sub(r"[^a-z0-9]+", "-", source.lower()).strip("-")[-40:] or "task"
    return Task(f"{slug}-{digest}", source, tuple(classes))


def who(root: str | Path = ".") -> tuple[str, str]:
    """The person promoting, as (name, email): the repository's git user.name and user.email, else the login
    name."""

    def config(key: str) -> str:
        try:
            return subprocess.run(["git", "config", key], cwd=root, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    name, email = config("user.name"), config("user.email")
    if not name:
        try:
            name = getpass.getuser()
        except (OSError, KeyError):
            name = "unknown"
    return name, email or f"{name}@localhost"


@dataclass(frozen=True)
class Champion:
    """A version of a task that is (or was) assigned the champion stage, as git and DVC hold it."""

    task: str
    version: str
    commit: str
    model: str  # BentoML model tag, from the promotion commit's reports/package.json
    metrics: dict
    promoted_by: str
    promoted_at: str
    how: str  # "pipeline" or "by hand"

    def describe(self) -> dict:
        return asdict(self)


class Champions:
    """The champions of every task in the git repository at `root`, read from and written to GTO's tags."""

    def __init__(self, root: str | Path = "."):
        self.root = Path(root)

    def _run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, **(env or {})}
        return subprocess.run(["git", *args], cwd=self.root, capture_output=True, text=True, env=env)

    def _git(self, *args: str, env: dict | None = None) -> str:
        proc = self._run(*args, env=env)
        if proc.returncode != 0:
            raise RegistryError(f"git {args[0]} in {self.root} failed: {proc.stderr.strip()}")
        return proc.stdout

    def _require_git(self) -> None:
        if self._run("rev-parse", "--git-dir").returncode:
            raise RegistryError(f"{self.root.resolve()} is not a git repository: champions are git tags (GTO)")

    def _file_at(self, commit: str, path: str) -> str | None:
        proc = self._run("show", f"{commit}:{path}")
        return proc.stdout if proc.returncode == 0 else None

    def _stage_tag(self, gto_call, task_id: str, version: str, message: str) -> None:
        """gto.api.assign or unassign of `version` in the champion stage, by the person promoting."""
        name, email = who(self.root)
        gto_call(
            str(self.root), task_id, stage=STAGE, version=version, message=message, author=name, author_email=email
        )

    def _events(self) -> list[dict]:
        """Every champion assignment and unassignment of every task, oldest first.

        The stage is replayed from this history rather than read from `gto.api.find_versions_in_stage`: GTO
        orders events by their tags' timestamps, which have one-second resolution, so after an unassign and a
        re-assign in the same second it reports the wrong versions in the stage. The `#N` counter of each
        stage tag breaks such ties."""
        import gto.api

        self._require_git()
        events = [e for e in gto.api.history(str(self.root), ascending=True) if e.get("stage") == STAGE]
        return sorted(events, key=lambda e: (e["timestamp"], _counter(e["ref"])))

    def tasks(self) -> list[str]:
        """The tasks that have had a champion, the one changed last first."""
        seen: dict[str, None] = {}
        for event in reversed(self._events()):
            seen.setdefault(event["artifact"])
        return list(seen)

    def latest(self) -> str | None:
        tasks = self.tasks()
        return tasks[0] if tasks else None

    def assigned(self, task_id: str) -> list[Champion]:
        """`task_id`'s versions in the champion stage: the champion first, then those a rollback returns to."""
        last: dict[str, dict] = {}
        for event in self._events():
            if event["artifact"] == task_id:
                last.pop(event["version"], None)
                last[event["version"]] = event
        active = [e for e in last.values() if e["event"] == "assignment"]
        return [self._champion(e) for e in reversed(active)]

    def champion(self, task_id: str) -> Champion | None:
        assigned = self.assigned(task_id)
        return assigned[0] if assigned else None

    def versions(self, task_id: str) -> dict[str, Champion]:
        """Every model ever promoted in `task_id`, by model tag (champion now or not)."""
        found = {}
        for event in self._events():
            if event["artifact"] == task_id and event["event"] == "assignment":
                champion = self._champion(event)
                found.setdefault(champion.model, champion)
        return found

    def _champion(self, event: dict) -> Champion:
        commit = event["commit"]
        package = self._file_at(commit, REPORT.as_posix())
        if package is None:
            raise RegistryError(f"{event['ref']} points at {commit[:12]}, which has no {REPORT}: not a T-GM champion")
        message = (event.get("message") or "").strip()
        return Champion(
            task=event["artifact"],
            version=event["version"],
            commit=commit,
            model=json.loads(package)["model_tag"],
            metrics=kept_metrics(json.loads(self._file_at(commit, METRICS) or "{}")),
            promoted_by=f"{event['author']} <{event['author_email']}>",
            promoted_at=event["timestamp"].isoformat(timespec="seconds"),
            how="by hand" if message.endswith("(by hand)") else "pipeline",
        )

    def promote(self, task: Task, how: str = "pipeline") -> dict:
        """Make the model packaged in this project (models/packaged/, reports/package.json) `task`'s champion:
        a new GTO version on a promotion commit, assigned the champion stage. What happened, as a dict."""
        import gto.api

        packaged = packaged_model(self.root)
        if packaged is None:
            raise RegistryError(f"nothing packaged in {self.root / PACKAGED}: `dvc repro package` makes it")
        tag = ensure_model(*packaged)
        current = self.champion(task.id)
        if current is not None and current.model == tag:
            return {"promoted": False, "why": f"{tag} is already the champion of {task.id}", **current.describe()}
        earlier = self.versions(task.id).get(tag)
        if earlier is not None and how == "pipeline":
            # A replaced or rolled-back champion stays so: only a person brings it back.
            why = (
                f"{tag} was champion {earlier.version} of {task.id} before; the pipeline does not bring it back "
                f"(`tgm champion promote {tag}` does)"
            )
            return {"promoted": False, "why": why, **earlier.describe()}
        message = f"{tag}: champion of {task.id} ({how})"
        if earlier is not None:
            version = earlier.version
        else:
            name, email = who(self.root)
            commit = self._promotion_commit(message, name, email)
            gto.api.register(str(self.root), task.id, commit, message=message, author=name, author_email=email)
            version = gto.api.find_latest_version(str(self.root), task.id).version
        self._stage_tag(gto.api.assign, task.id, version, message)
        champion = self.champion(task.id)
        log.info("registry: %s is now the champion of task %s (%s)", tag, task.id, champion.version)
        return {"promoted": True, "why": message, **champion.describe()}

    def _promotion_commit(self, message: str, name: str, email: str) -> str:
        """A commit of the project as it is now (what git would commit with `git add -A`), parented on HEAD,
        on no branch: the GTO tags made on it keep it."""
        identity = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email}
        identity |= {"GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}
        with tempfile.TemporaryDirectory() as tmp:
            index = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            head = self._run("rev-parse", "--verify", "-q", "HEAD")
            parent = ["-p", head.stdout.strip()] if head.returncode == 0 else []
            if parent:
                self._git("read-tree", "HEAD", env=index)
            self._git("add", "-A", ".", env=index)
            tree = self._git("write-tree", env=index).strip()
        return self._git("commit-tree", tree, *parent, "-m", message, env=identity).strip()

    def bring_back(self, model: str) -> dict:
        """`tgm champion promote TAG` for a model that was a champion before: assign its version again."""
        for task_id in self.tasks():
            earlier = self.versions(task_id).get(model)
            if earlier is not None:
                import gto.api

                self._stage_tag(
                    gto.api.assign, task_id, earlier.version, f"{model}: champion of {task_id} again (by hand)"
                )
                return self.champion(task_id).describe()
        raise RegistryError(f"{model} is neither the model packaged here nor an earlier champion of any task")

    def rollback(self, task_id: str | None = None) -> Champion:
        """Unassign `task_id`'s champion (default: the task changed last), so the one before it serves again."""
        import gto.api

        task_id = task_id or self.latest()
        assigned = self.assigned(task_id) if task_id else []
        if not assigned:
            raise RegistryError(f"no task {task_id!r} has a champion here (tasks: {', '.join(self.tasks()) or 'none'})")
        if len(assigned) < 2:
            raise RegistryError(f"task {task_id} has no earlier champion to roll back to")
        dropped = assigned[0]
        self._stage_tag(gto.api.unassign, task_id, dropped.version, f"{dropped.model}: rolled back")
        log.info("registry: rolled task %s back from %s to %s", task_id, dropped.model, assigned[1].model)
        return assigned[1]

    def ensure_in_store(self, champion: Champion) -> str:
        """The champion's model tag, imported into the local BentoML store from its promotion commit's export
        (through dvc.api: the local DVC cache, else the remote) when the store lacks it."""
        from tgm.store import in_store

        if in_store(champion.model):
            return champion.model
        import dvc.api
        from dvc.exceptions import DvcException

        path = (PACKAGED / MODEL_FILE).as_posix()
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / MODEL_FILE
            try:
                with dvc.api.open(path, repo=str(self.root), rev=champion.commit, mode="rb") as src:
                    with open(local, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            except (DvcException, OSError) as exc:  # not in the cache, no remote, or not on the remote
                raise RegistryError(
                    f"champion {champion.model} ({champion.task} {champion.version}) is not in the BentoML store "
                    f"and its export is in neither the DVC cache nor the remote ({type(exc).__name__}: {exc}); "
                    "`dvc pull` on a clone of the commit that made it, or `dvc fetch --all-tags`, fetches it"
                ) from None
            return ensure_model(champion.model, local)


def _counter(ref: str) -> int:
    """The N of GTO's `name#stage#N` (order of events within a second); 0 for a version tag."""
    found = re.search(r"#(\d+)$", ref)
    return int(found.group(1)) if found else 0


def served_model(root: str | Path = ".", task_id: str | None = None) -> str | None:
    """The tag `bentoml serve` in a project should serve: the champion of TGM_TASK, else of the task promoted
    last; before any promotion, the model `package` wrote in this project; None when there is neither. Either
    is imported into the local BentoML store first if it is not there."""
    champions = Champions(root)
    try:
        task_id = task_id or champions.latest()
    except RegistryError:  # not a git repository: no champions, only what was packaged here
        task_id = None
    champion = champions.champion(task_id) if task_id else None
    if champion:
        return champions.ensure_in_store(champion)
    if task_id is None and (packaged := packaged_model(root)) is not None:
        return ensure_model(*packaged)
    return None


def promote(*, package_report: str | Path, gate_report: str | Path, report_path: str | Path) -> dict:
    """The `promote` stage: the model `package` just saved, which passed the gate, becomes its task's champion
    (unless it is already, or was before); reports/promotion.json says which."""
    gate = read_json(gate_report)
    if not gate.get("passed"):
        raise RegistryError(f"promote: {gate_report} says the gate failed; refusing to promote")
    read_json(package_report)  # the packaged model's report must be there and whole
    # The task the gate judged the model for (and compared it within): the same task it is promoted in.
    result = Champions().promote(Task.from_dict(gate["task"]), "pipeline")
    if not result["promoted"]:
        log.info("promote: %s", result["why"])
    write_json(report_path, result)
    return result
