"""dvc.yaml cannot drift from the stage table (tgm/stages.py), where each stage is written once: its command,
its params, the files it reads and writes, and its code.

`dvc repro` reruns a stage when one of its deps changes, so a module a stage imports but does not declare is a
change DVC cannot see (stale results while `dvc status` says all is current), and a param it takes but does not
declare the same. Imports are read from the source, at any depth (the stages import lazily inside functions),
and followed transitively from the runner (tgm/stages.py) and the stage's module; the command line (tgm/cli.py:
arguments, help texts, the version) is no code dep of any stage.
"""

import ast
import shutil
from pathlib import Path

import yaml
from conftest import ROOT

from tgm.params import Params
from tgm.stages import STAGES

# The runner every stage goes through.
ENTRY = ["tgm.stages"]
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


def code_deps(root: Path, stage: str) -> set[str]:
    return module_closure(root, ENTRY + [STAGES[stage].run.split(":")[0]] + EXTRA_ROOTS.get(stage, []))


def undeclared_and_unused(root: Path) -> dict[str, tuple[set[str], set[str]]]:
    """Per stage of root/dvc.yaml: (tgm/ files imported but not declared, tgm/ files declared but not imported)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for stage, spec in stages.items():
        needed = code_deps(root, stage)
        declared = {d for d in spec.get("deps", []) if d.startswith("tgm/") and d.endswith(".py")}
        if needed != declared:
            out[stage] = (needed - declared, declared - needed)
    return out


def expected_params(stage) -> set[str]:
    """The dotted keys a stage takes: every key of each group it takes, but those it sets itself."""
    keys = set()
    for spec in stage.params:
        group, _, key = spec.partition(".")
        if key:
            keys.add(spec)
            continue
        fields = Params.model_fields[group].annotation.model_fields
        keys |= {f"{group}.{name}" for name in fields if name not in stage.sets.get(group, ())}
    return keys


def declared_params(spec: dict) -> set[str]:
    """dvc.yaml's params of a stage as dotted keys: a whole group (`- ingest`) is every key of it."""
    keys = set()
    for entry in spec.get("params", []):
        if "." in entry:
            keys.add(entry)
        else:
            keys |= {f"{entry}.{name}" for name in Params.model_fields[entry].annotation.model_fields}
    return keys


def out_paths(spec: dict) -> set[str]:
    found = set()
    for kind in ("outs", "metrics", "plots"):
        for out in spec.get(kind, []):
            found.add(next(iter(out)) if isinstance(out, dict) else out)
    return found


def test_every_stage_declares_exactly_the_modules_it_imports():
    problems = undeclared_and_unused(ROOT)
    assert not problems, "\n".join(
        f"dvc.yaml stage {stage}: add {sorted(missing)} to its deps, remove {sorted(extra)}"
        for stage, (missing, extra) in problems.items()
    )


def test_dvc_yaml_has_exactly_the_stages_of_the_table_with_their_command_params_data_and_outputs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == [name for name, stage in STAGES.items() if stage.dvc]
    for name, spec in stages.items():
        stage = STAGES[name]
        assert spec["cmd"] == f"tgm {name}"
        assert declared_params(spec) == expected_params(stage), name
        data_deps = {d for d in spec.get("deps", []) if not d.startswith("tgm/")}
        assert data_deps == set(stage.reads.values()) | set(stage.watches), name
        outs = out_paths(spec)
        for path in stage.writes.values():  # a path the stage writes is an out, or a folder of outs
            assert any(o == path or o.startswith(path + "/") for o in outs), (name, path)
        for out in outs:
            assert any(out == p or out.startswith(p + "/") for p in stage.writes.values()), (name, out)
        assert not set(stage.untracked.values()) & (outs | data_deps), name
        assert spec.get("always_changed", False) == stage.always, name


def test_a_stage_function_takes_exactly_what_the_table_passes():
    import importlib
    import inspect

    from tgm.params import load_params
    from tgm.stages import arguments

    params = load_params(ROOT / "params.yaml")
    for name, stage in STAGES.items():
        module, function = stage.run.split(":")
        signature = inspect.signature(getattr(importlib.import_module(module), function))
        args, kwargs = arguments(stage, params)
        bound = signature.bind(*args, **kwargs)  # raises on a missing or an unexpected argument
        missing = [
            p for p in signature.parameters.values() if p.name not in bound.arguments and p.kind != p.VAR_KEYWORD
        ]
        assert all(p.default is not inspect.Parameter.empty for p in missing), (name, missing)


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
    assert "tgm/study.py" in missing and "tgm/training/loop.py" in missing  # study's own imports come along


def test_the_command_line_help_and_version_are_no_code_dep_of_any_stage():
    for name, stage in STAGES.items():
        if stage.dvc:
            deps = code_deps(ROOT, name)
            assert "tgm/cli.py" not in deps, name
    assert (ROOT / "tgm" / "__init__.py").read_text().count("version") == 0  # the version lives in pyproject.toml
