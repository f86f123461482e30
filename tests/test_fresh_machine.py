"""A committed project on a machine that never ran it: a git clone with no DVC cache, an empty BentoML store, an
empty Prefect home and an empty home directory. Every front door works there with what git and DVC carry:
`dvc repro` passes with the committed dvc.lock, `bentoml serve` classifies, `tgm champion show`, `tgm drift`
and the Prefect flow run. Nothing a stage needs may live only on the machine that ran the pipeline first."""

import json
import os
import re
import shutil
import sys

import httpx
import pytest
import yaml
from conftest import run
from support import local_server

pytestmark = pytest.mark.slow


def outs_of(project, stage: str) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {o["path"]: o.get("md5") for o in lock["stages"][stage].get("outs", [])}


def new_machine(tmp_path) -> dict:
    """The environment of a machine with nothing in its home: no BentoML store, no Prefect database, no caches."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BENTOML_", "PREFECT_", "XDG_", "TORCHINDUCTOR"))}
    env.update(
        HOME=str(home),
        BENTOML_HOME=str(home / "bentoml"),
        PREFECT_HOME=str(home / ".prefect"),
        BENTOML_DO_NOT_TRACK="True",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


def test_a_fresh_clone_with_empty_stores_reproduces_serves_and_runs_the_flow(built_project, tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(built_project), str(clone)], tmp_path)
    assert not (clone / "models" / "packaged").exists()
    env = new_machine(tmp_path)

    proc = run(["dvc", "repro"], clone, env=env, timeout=900)
    ran = re.findall(r"Running stage '([^']+)'", proc.stdout)
    assert "package" in ran and "promote" in ran, proc.stdout
    # The same inputs on the same machine give the same models, and so the same packaged model tag.
    for stage in ("pretrain", "finetune"):
        assert outs_of(clone, stage) == outs_of(built_project, stage)
    tag = json.loads((clone / "reports/package.json").read_text())["model_tag"]
    assert tag == json.loads((built_project / "reports/package.json").read_text())["model_tag"]
    assert (clone / "models/packaged/model.bentomodel").stat().st_size > 0
    assert json.loads(run(["dvc", "status", "--json"], clone, env=env).stdout or "{}") == {"gate": ["always changed"]}

    shown = run(["tgm", "champion", "show"], clone, env=env).stdout
    assert tag in shown

    server, url, _ = local_server.start([], clone, env)
    try:
        meta = httpx.get(f"{url}/metadata", timeout=10).json()
        assert meta["model"] == tag
        image = sorted((clone / "data/raw/images/3").iterdir())[0]
        r = httpx.post(f"{url}/classify", files=[("image", (image.name, image.read_bytes(), "image/png"))], timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["label"] in meta["classes"]
    finally:
        local_server.stop(server)
    listed = run(["bentoml", "models", "list", "-o", "json"], clone, env=env).stdout
    assert tag in {m["tag"] for m in json.loads(listed)}

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for image in sorted((clone / "data/raw/images").rglob("*.png"))[::40][:30]:
        shutil.copy(image, incoming / f"{image.parent.name}-{image.name}")
    run(["tgm", "drift", "--folder", str(incoming)], clone, env=env)
    assert json.loads((clone / "reports/drift.json").read_text())["scored"] == 30

    # The flow on a Prefect home with no database: Prefect starts its own server; DVC says all is current but
    # the gate, which always runs (its verdict unchanged, nothing after it does).
    flow = run([sys.executable, "-m", "flows.pipeline", "--no-experiment"], clone, env=env, timeout=600)
    assert set(re.findall(r"Running stage '([^']+)'", flow.stdout + flow.stderr)) == {"gate"}
