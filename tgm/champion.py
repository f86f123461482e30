"""`tgm champion show | promote | rollback`: the project's front door to the champions that tgm.registry keeps on
GTO. No stage imports this module, so its texts can change without making any stage stale."""

from __future__ import annotations

from pathlib import Path

from tgm.io import read_json
from tgm.registry import Champions, RegistryError, Task
from tgm.store import packaged_model


def show(champions: Champions) -> str:
    tasks = champions.tasks()
    if not tasks:
        return "no champion yet (champions are git tags: `git fetch --tags` brings those pushed elsewhere)"
    rows = []
    for task_id in tasks:
        assigned = champions.assigned(task_id)
        mark = " (latest)" if task_id == tasks[0] else ""
        if not assigned:
            rows.append(f"{task_id}{mark}: none (every champion was rolled back)")
            continue
        c = assigned[0]
        rows.append(
            f"{task_id}{mark}: {c.model} ({c.version})  accuracy {c.metrics.get('accuracy')}  "
            f"promoted {c.promoted_at} by {c.promoted_by} ({c.how}); {len(assigned) - 1} earlier"
        )
    return "\n".join(rows)


SHARE = "share it with `git push --tags` (or `git push origin <tag>`)"


def champion_command(action: str, model: str | None, task_id: str | None, root: str | Path = ".") -> str:
    """`tgm champion show|promote|rollback`: what to print."""
    champions = Champions(root)
    if action == "show":
        return show(champions)
    if action == "rollback":
        champion = champions.rollback(task_id)
        return f"{champion.model} is the champion of {champion.task} again; {SHARE}"
    if not model:
        raise RegistryError("tgm champion promote needs a model tag, e.g. tgm-classifier:abc123")
    packaged = packaged_model(root)
    if packaged is not None and packaged[0] == model:
        gate = read_json(Path(root) / "reports/gate.json")
        if not gate.get("passed"):
            raise RegistryError(f"{model} did not pass the gate (reports/gate.json); refusing to promote")
        result = champions.promote(Task.from_dict(gate["task"]), "by hand")
    else:
        result = champions.bring_back(model)
    return f"{result['model']} is the champion of {result['task']}; {SHARE}"
