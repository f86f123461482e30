"""The local BentoML store, filled on demand from DVC-tracked exports: no stage assumes a model is already there.

`package` writes its product as files that DVC caches, pushes and pulls (models/packaged/):

    models/packaged/model.bentomodel    the gated classifier with its metadata and model card (`bentoml export`)
    models/packaged/service.bento       the Bento built for it, when package.build_bento is true

The BentoML store (BENTOML_HOME, default ~/bentoml) is a cache of these: `promote`, `tgm champion` and
`bentoml serve` import a model from its export the first time they need it on a machine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tgm.errors import UserError

log = logging.getLogger(__name__)

PACKAGED = Path("models/packaged")
MODEL_FILE = "model.bentomodel"
BENTO_FILE = "service.bento"
REPORT = Path("reports/package.json")


class ModelNotFound(UserError):
    """A model tag that neither the local BentoML store nor any export on disk holds."""


def bentoml_home() -> str:
    return os.environ.get("BENTOML_HOME", str(Path.home() / "bentoml"))


def in_store(tag: str) -> bool:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentoml.models.get(tag)
    except NotFound:
        return False
    return True


def ensure_model(tag: str, exported: str | Path) -> str:
    """`tag` in the local BentoML store, imported from its export `exported` first when the store lacks it."""
    import bentoml

    if in_store(tag):
        return tag
    exported = Path(exported)
    if not exported.exists():
        raise ModelNotFound(
            f"model {tag} is not in the BentoML store ({bentoml_home()}) and its export {exported} is missing: "
            "`dvc pull` fetches it, or `dvc repro` rebuilds it"
        )
    model = bentoml.models.import_model(str(exported.resolve()))
    if str(model.tag) != tag:
        raise ModelNotFound(f"{exported} holds {model.tag}, not {tag}: `dvc checkout` restores the recorded export")
    log.info("imported %s into the BentoML store from %s", tag, exported)
    return tag


def packaged_model(root: str | Path = ".") -> tuple[str, Path] | None:
    """(tag, export) of the model `package` last wrote in the project at `root`, or None before it ran."""
    import json

    report = Path(root) / REPORT
    exported = Path(root) / PACKAGED / MODEL_FILE
    if not report.exists() or not exported.exists():
        return None
    return json.loads(report.read_text())["model_tag"], exported
