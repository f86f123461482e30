"""package: the gated classifier as a BentoML model, with its model card, and a Bento, exported as DVC outputs.

The product is the files in models/packaged/ (tgm.store), which DVC caches and pushes like any other output: a
machine that lacks them reruns `package` or fetches them with `dvc pull`, and the local BentoML store is filled
from them when a model is needed there. The model's version is a digest of what it is made of (weights,
calibration, metadata but the commit), so the same inputs give the same tag on any machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import yaml

from tgm.errors import UserError
from tgm.git import git_commit
from tgm.io import atomic_dir, read_json, write_json, write_text
from tgm.model_card import FILE as CARD_FILE
from tgm.model_card import model_card
from tgm.params import Group, PackageParams
from tgm.store import BENTO_FILE, MODEL_FILE
from tgm.typicality import FILE as TYPICALITY_FILE
from tgm.typicality import Typicality

log = logging.getLogger(__name__)


def prepared_data_hash(lock_path: str | Path = "dvc.lock", out: str = "data/prepared") -> str:
    """The hash DVC recorded for the prepared data, so a model can be traced to the exact tokens."""
    try:
        lock = yaml.safe_load(Path(lock_path).read_text()) or {}
        for entry in lock.get("stages", {}).get("prepare", {}).get("outs", []):
            if entry.get("path") == out:
                return entry.get("md5", "unknown")
    except (OSError, yaml.YAMLError):
        pass
    return "unknown"


def _without_nulls(value):
    # BentoML metadata refuses None; a param left null (gate.max_regression: off) is simply absent there.
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def model_version(classifier_dir: Path, typicality_path: Path, metadata: dict) -> str:
    """A digest of the packaged model's contents; the commit is left out, as it names where, not what."""
    h = hashlib.sha256()
    for f in sorted(classifier_dir.iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(typicality_path.read_bytes())
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "git_commit"}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _save_model(tag: str, metadata: dict, labels: dict, files: list[Path], card: str) -> None:
    """`tag` in the local store, made anew: a model of the same tag left by an earlier run is replaced."""
    import bentoml

    from tgm.store import in_store

    if in_store(tag):
        bentoml.models.delete(tag)
    with bentoml.models.create(tag, metadata=metadata, labels=labels) as model_ref:
        for f in files:
            shutil.copy2(f, Path(model_ref.path) / f.name)
        (Path(model_ref.path) / CARD_FILE).write_text(card)


def _build_bento(model_tag: str, version: str, out: Path) -> str:
    import bentoml
    from bentoml.exceptions import NotFound

    from tgm.bento_env import pinned_requirements

    config = yaml.safe_load(Path("bentofile.yaml").read_text())
    try:
        bentoml.bentos.delete(f"{config['name']}:{version}")
    except NotFound:
        pass
    # The tested environment, not today's resolution of bentofile.yaml's names: their closure as constraints.txt
    # pins it, in a bentofile of this build's own.
    names = config["python"].pop("packages")
    build = Path("build")
    build.mkdir(exist_ok=True)
    (build / "bento-requirements.txt").write_text(pinned_requirements(names))
    config["python"].update(requirements_txt="build/bento-requirements.txt", lock_packages=False)
    (build / "bentofile.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # Pin the Bento to the model version just saved, not whatever is "latest" when it is served: a Bento
    # argument is stored in bento.yaml and restored before the service is imported at serve time.
    bento = bentoml.bentos.build_bentofile(
        str(build / "bentofile.yaml"), build_ctx=".", version=version, args={"model": model_tag}
    )
    bentoml.bentos.export_bento(bento.tag, str(out.resolve()))
    return str(bento.tag)


def package(
    params: PackageParams,
    *,
    classifier_dir: str | Path,
    gate_report: str | Path,
    typicality_path: str | Path,
    out_dir: str | Path,
    report_path: str | Path,
    card_path: str | Path,
    **shaped_by: Group,
) -> dict:
    """`shaped_by`: the params groups that made the model (tgm/stages.py), recorded in its metadata and card."""
    import bentoml

    recorded = {name: group.model_dump() for name, group in shaped_by.items()} | {"package": params.model_dump()}
    report = read_json(gate_report)
    if not report.get("passed"):
        raise UserError(f"package: {gate_report} says the gate failed; refusing to package")
    classifier_dir, typicality_path = Path(classifier_dir), Path(typicality_path)
    config = read_json(classifier_dir / "config.json")
    commit, data_hash = git_commit(), prepared_data_hash()
    metadata = {
        "task": report["task"],
        "metrics": read_json("metrics/evaluate.json"),
        "params": _without_nulls(recorded),
        "git_commit": commit,
        "data_hash": data_hash,
        "classes": config["classes"],
        "model": config["model"],
        "preprocess": read_json(classifier_dir / "preprocess.json"),
        "typicality": Typicality.load(typicality_path).describe(),
    }
    labels = {"project": "t-gm", "gate": "passed", "task": report["task"]["id"]}
    version = model_version(classifier_dir, typicality_path, metadata)
    tag = f"{params.model_name}:{version}"
    card = model_card(tag, report["task"], recorded, commit, data_hash, report)
    # The service's typical range of bits per pixel, calibrated by evaluate on the validation split, travels
    # inside the model beside the weights.
    calibration = Path(tempfile.mkdtemp()) / TYPICALITY_FILE
    shutil.copy2(typicality_path, calibration)
    try:
        _save_model(tag, metadata, labels, [*sorted(classifier_dir.iterdir()), calibration], card)
    finally:
        shutil.rmtree(calibration.parent)
    log.info("package: saved %s", tag)
    result = {"model_tag": tag, "bento_tag": None}
    with atomic_dir(out_dir) as tmp:
        bentoml.models.export_model(tag, str((tmp / MODEL_FILE).resolve()))
        if params.build_bento:
            result["bento_tag"] = _build_bento(tag, version, tmp / BENTO_FILE)
            log.info("package: built Bento %s", result["bento_tag"])
    write_text(card_path, card)
    write_json(report_path, result)
    return result
