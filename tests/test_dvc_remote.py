"""Data and models leave the machine through DVC remotes: the committed default local remote, and S3 (against a
real moto_server on 127.0.0.1). A fresh clone plus `dvc pull` must restore every output byte for byte, with
nothing to re-run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run
from support import local_server

pytestmark = pytest.mark.slow

BUCKET = "tgm-test"
PREFIX = "dvcstore"


def outputs_in_lock(project: Path) -> tuple[list[str], list[str]]:
    """(cached, git-tracked) output paths of every stage in dvc.lock."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    uncached = set()
    for stage in spec["stages"].values():
        for section in ("outs", "metrics", "plots"):
            for out in stage.get(section, []):
                if isinstance(out, dict):
                    ((path, opts),) = out.items()
                    if opts and opts.get("cache") is False:
                        uncached.add(path)
    paths = sorted({out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])})
    return [p for p in paths if p not in uncached], [p for p in paths if p in uncached]


def digest(root: Path, rel_paths: list[str]) -> dict[str, str]:
    """sha256 of every file under each path; a missing path maps to None so that it fails the comparison."""
    out: dict[str, str] = {}
    for rel in rel_paths:
        top = root / rel
        if not top.exists():
            out[rel] = None
            continue
        files = [top] if top.is_file() else sorted(f for f in top.rglob("*") if f.is_file())
        for f in files:
            out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def cache_files(project: Path) -> list[Path]:
    cache = project / ".dvc" / "cache"
    return [f for f in cache.rglob("*") if f.is_file()] if cache.exists() else []


def assert_restored(original: Path, clone: Path, env: dict | None = None) -> None:
    cached, tracked = outputs_in_lock(original)
    assert {"data/raw", "data/prepared", "models/pretrained", "models/classifier"} <= set(cached), cached
    expected = digest(original, cached + tracked)
    assert expected and None not in expected.values()
    assert digest(clone, cached + tracked) == expected

    # The gate always runs (the champion is a git tag DVC cannot see); nothing else may be stale.
    status = json.loads(run(["dvc", "status", "--json"], clone, env=env).stdout or "{}")
    assert status == {"gate": ["always changed"]}, status
    out = run(["dvc", "repro"], clone, env=env, timeout=600).stdout
    assert re.findall(r"Running stage '([^']+)'", out) == ["gate"], out
    # Every other stage was looked at and found unchanged, so the list above is not a parsing accident.
    stages = yaml.safe_load((original / "dvc.yaml").read_text())["stages"]
    assert set(re.findall(r"Stage '([^']+)' didn't change, skipping", out)) == set(stages) - {"gate"}, out


def assert_fixture_untouched(project: Path) -> None:
    assert run(["git", "status", "--porcelain"], project).stdout == ""
    assert not (project / ".dvc" / "config.local").exists()
    assert json.loads(run(["dvc", "status", "--json"], project).stdout or "{}") == {"gate": ["always changed"]}


def fresh_clone(project: Path, name: str) -> Path:
    clone = project.parent / name
    shutil.rmtree(clone, ignore_errors=True)
    run(["git", "clone", "-q", str(project), str(clone)], project.parent)
    # Nothing may come from the original's cache: the clone has its own, empty one.
    assert cache_files(clone) == []
    assert Path(run(["dvc", "cache", "dir"], clone).stdout.strip()).resolve() == (clone / ".dvc" / "cache").resolve()
    return clone


def test_local_remote_round_trip(digits_project):
    project = digits_project
    storage = project.parent / "tgm-dvc-storage"
    shutil.rmtree(storage, ignore_errors=True)
    clone = None
    try:
        # The committed default: a folder next to the repository, resolved against .dvc/.
        assert run(["dvc", "remote", "default"], project).stdout.strip() == "local"
        url = run(["dvc", "config", "remote.local.url"], project).stdout.strip()
        assert Path(url).resolve() == storage.resolve()

        run(["dvc", "push"], project, timeout=300)
        pushed = [f for f in storage.rglob("*") if f.is_file()]
        assert pushed, "dvc push wrote nothing to the local remote"
        assert json.loads(run(["dvc", "status", "--cloud", "--json"], project).stdout or "{}") == {}

        clone = fresh_clone(project, "clone")
        assert not any(f.is_file() for f in (clone / "models").rglob("*") if f.name != ".gitignore")
        run(["dvc", "pull"], clone, timeout=300)
        assert cache_files(clone)
        assert_restored(project, clone)
    finally:
        if clone is not None:
            shutil.rmtree(clone, ignore_errors=True)
        shutil.rmtree(storage, ignore_errors=True)
    assert_fixture_untouched(project)


@pytest.fixture
def s3_env(tmp_path) -> dict:
    """Environment for boto3 and dvc-s3: dummy credentials only, no profile or proxy in the way."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AWS_") and k.lower() not in {"http_proxy", "https_proxy", "all_proxy"}
    }
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(tmp_path / "aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "aws-credentials"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


@pytest.fixture
def moto_endpoint(s3_env):
    """A real S3 API (moto_server) on 127.0.0.1, stopped whatever the test does."""
    port = local_server.free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Only s3_env: variables it leaves out (other AWS settings, proxies) are removed, not inherited.
    env = {**{k: None for k in os.environ}, **s3_env}
    proc, _ = local_server.start_process(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        ".",
        env,
        "moto-server",
        ready_url=endpoint + "/",
        timeout_s=60,
    )
    try:
        yield endpoint
    finally:
        local_server.stop(proc)


def s3_client(endpoint: str, env: dict):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def add_s3_remote(repo: Path, endpoint: str, env: dict) -> None:
    # --local: the endpoint (and any credentials) stay out of the committed .dvc/config.
    run(["dvc", "remote", "add", "--local", "s3store", f"s3://{BUCKET}/{PREFIX}"], repo, env=env)
    run(["dvc", "remote", "modify", "--local", "s3store", "endpointurl", endpoint], repo, env=env)


def cached_md5s(project: Path) -> set[str]:
    """Every object the workspace's cached outputs need: each .dir listing and each file in it."""
    cached, _ = outputs_in_lock(project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    want = set()
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] not in cached:
                continue
            want.add(out["md5"])
            if out["md5"].endswith(".dir"):
                listing = project / ".dvc" / "cache" / "files" / "md5" / out["md5"][:2] / out["md5"][2:]
                want.update(entry["md5"] for entry in json.loads(listing.read_text()))
    return want


def test_s3_remote_round_trip(digits_project, moto_endpoint, s3_env):
    project = digits_project
    config_local = project / ".dvc" / "config.local"
    assert not config_local.exists()
    s3 = s3_client(moto_endpoint, s3_env)
    s3.create_bucket(Bucket=BUCKET)
    clone = None
    try:
        add_s3_remote(project, moto_endpoint, s3_env)
        run(["dvc", "push", "-r", "s3store"], project, env=s3_env, timeout=300)

        keys = set()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/"):
            keys.update(obj["Key"] for obj in page.get("Contents", []))
        pushed = {k.removeprefix(f"{PREFIX}/files/md5/").replace("/", "", 1) for k in keys}
        missing = cached_md5s(project) - pushed
        assert not missing, f"{len(missing)} objects not in the bucket, e.g. {sorted(missing)[:3]}"

        clone = fresh_clone(project, "s3-clone")
        add_s3_remote(clone, moto_endpoint, s3_env)
        run(["dvc", "pull", "-r", "s3store"], clone, env=s3_env, timeout=300)
        assert_restored(project, clone, env=s3_env)
    finally:
        config_local.unlink(missing_ok=True)
        if clone is not None:
            shutil.rmtree(clone, ignore_errors=True)
    assert_fixture_untouched(project)


def test_each_artifact_is_fetched_by_name_from_another_clone(digits_project, tmp_path):
    """dvc.yaml's artifacts, registered as versions (GTO git tags), fetched with `dvc artifacts get` into a
    second clone: byte for byte what the first project made."""
    first = digits_project
    artifacts = yaml.safe_load((first / "dvc.yaml").read_text())["artifacts"]
    assert set(artifacts) == {"tgm-base", "tgm-classifier", "tgm-classifier-bento"}
    for name in artifacts:
        run(["gto", "register", name, "HEAD"], first)
    second = tmp_path / "second"
    run(["git", "clone", "-q", str(first), str(second)], tmp_path)
    for name, spec in artifacts.items():
        assert spec["type"] == "model" and spec["desc"] and spec["labels"]
        out = tmp_path / "fetched" / name
        run(["dvc", "artifacts", "get", str(first), name, "-o", str(out)], second, timeout=300)
        made = {
            p.relative_to(first / spec["path"]): p.read_bytes()
            for p in (first / spec["path"]).rglob("*")
            if p.is_file()
        }
        got = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert got == made and made, name
