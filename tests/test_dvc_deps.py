"""dvc.yaml's code dependencies cannot drift: each stage declares exactly the tgm/ modules its command imports.

`dvc repro` reruns a stage when one of its deps changes, so a module a stage imports but does not declare is a
change DVC cannot see (stale results while `dvc status` says all is current). The imports are read from the
source, at any depth (the stages import lazily inside functions), and followed transitively.
"""

import ast
import shutil
from pathlib import Path

import yaml
from conftest import ROOT

from tgm.cli import STAGE_MODULES

# The `tgm` command itself: every stage runs through it.
ENTRY = ["tgm.cli"]
# The package stage builds a Bento around the service, so the service's code is part of what it makes.
EXTRA_ROOTS = {"package": ["tgm.service"]}


def imported_modules(path: Path) -> set[str]:
    """The `tgm.*` modules a file imports, wherever in the file the import is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "tgm"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tgm":
            found.add(node.module)
            # `from tgm import io` names a module; `from tgm.io import write_json` does not.
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def module_closure(root: Path, modules: list[str]) -> set[str]:
    """Every tgm/ source file (relative to `root`) that `modules` import, directly or not."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b runs a/__init__.py first
        for rel in (f"{'/'.join(parts)}.py", f"{'/'.join(parts)}/__init__.py"):
            if rel not in seen and (root / rel).is_file():  # else a name imported from a module, not a module
                seen.add(rel)
                todo += imported_modules(root / rel)
    return seen


def undeclared_and_unused(root: Path) -> dict[str, tuple[set[str], set[str]]]:
    """Per stage of root/dvc.yaml: (tgm/ files imported but not declared, tgm/ files declared but not imported)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for stage, spec in stages.items():
        needed = module_closure(root, ENTRY + [STAGE_MODULES[stage]] + EXTRA_ROOTS.get(stage, []))
        declared = {d for d in spec.get("deps", []) if d.startswith("tgm/") and d.endswith(".py")}
        if needed != declared:
            out[stage] = (needed - declared, declared - needed)
    return out


def test_every_stage_declares_exactly_the_modules_it_imports():
    problems = undeclared_and_unused(ROOT)
    assert not problems, "\n".join(
        f"dvc.yaml stage {stage}: add {sorted(missing)} to its deps, remove {sorted(extra)}"
        for stage, (missing, extra) in problems.items()
    )


def test_every_stage_runs_a_module_of_the_cli():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, spec in stages.items():
        assert spec["cmd"] == f"tgm {stage}"
        assert stage in STAGE_MODULES


def test_an_undeclared_new_import_is_caught(tmp_path):
    shutil.copytree(ROOT / "tgm", tmp_path / "tgm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    assert undeclared_and_unused(tmp_path) == {}
    gate = tmp_path / "tgm" / "gate.py"
    # Inside a function, as the stages import: the check must see it there too.
    gate.write_text(
        gate.read_text() + "\n\ndef _later():\n    from tgm.study import summarise\n\n    return summarise\n"
    )
    problems = undeclared_and_unused(tmp_path)
    assert set(problems) == {"gate"}
    missing, _ = problems["gate"]
    assert "tgm/study.py" in missing and "tgm/train.py" in missing  # study's own imports come along
