"""package: put the gated classifier into the BentoML model store, with its model card, and build a Bento."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from tgm.errors import UserError
from tgm.io import read_json, write_json, write_text
from tgm.model_card import FILE as CARD_FILE
from tgm.model_card import model_card
from tgm.params import Params
from tgm.registry import git_commit
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


def package(
    params: Params,
    params_path: str = "params.yaml",
    classifier_dir: str | Path = "models/classifier",
    gate_report: str | Path = "reports/gate.json",
    report_path: str | Path = "reports/package.json",
    typicality_path: str | Path = "reports/typicality.json",
    card_path: str | Path = "reports/model_card.md",
) -> dict:
    import bentoml

    report = read_json(gate_report)
    if not report.get("passed"):
        raise UserError(f"package: {gate_report} says the gate failed; refusing to package")
    config = read_json(Path(classifier_dir) / "config.json")
    commit, data_hash = git_commit(), prepared_data_hash()
    metadata = {
        "task": report["task"],
        "metrics": read_json("metrics/evaluate.json"),
        "params": _without_nulls(params.model_dump()),
        "git_commit": commit,
        "data_hash": data_hash,
        "classes": config["classes"],
        "model": config["model"],
        "preprocess": read_json(Path(classifier_dir) / "preprocess.json"),
        "typicality": Typicality.load(typicality_path).describe(),
    }
    labels = {"project": "t-gm", "gate": "passed", "task": report["task"]["id"]}
    with bentoml.models.create(params.package.model_name, metadata=metadata, labels=labels) as model_ref:
        for f in Path(classifier_dir).iterdir():
            shutil.copy2(f, Path(model_ref.path) / f.name)
        # The service's typical range of bits per pixel, calibrated by evaluate on the validation split.
        shutil.copy2(typicality_path, Path(model_ref.path) / TYPICALITY_FILE)
        card = model_card(str(model_ref.tag), report["task"], params.model_dump(), commit, data_hash, report)
        (Path(model_ref.path) / CARD_FILE).write_text(card)
    write_text(card_path, card)
    log.info("package: saved %s", model_ref.tag)
    result = {"model_tag": str(model_ref.tag), "bento_tag": None}
    if params.package.build_bento:
        # Pin the Bento to the model version just saved, not whatever is "latest" when it is served: a Bento
        # argument is stored in bento.yaml and restored before the service is imported at serve time.
        bento = bentoml.bentos.build_bentofile("bentofile.yaml", build_ctx=".", args={"model": str(model_ref.tag)})
        result["bento_tag"] = str(bento.tag)
        log.info("package: built Bento %s", bento.tag)
    write_json(report_path, result)
    return result
