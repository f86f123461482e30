"""params.yaml is checked once, with errors that name the key; dvc.yaml declares every parameter."""

import dataclasses

import pytest
import yaml
from conftest import ROOT

from tgm.params import Params, ParamsError, load_params, parse_params

# Which dvc.yaml stage reads each params group.
STAGE_OF_GROUP = {
    "ingest": "ingest",
    "validate": "validate",
    "prepare": "prepare",
    "model": "pretrain",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "probe": "probe",
    "study": "study",
    "evaluate": "evaluate",
    "gate": "gate",
    "package": "package",
}


def test_project_params_load_and_pass_their_checks():
    params = load_params(ROOT / "params.yaml")
    assert params.ingest.source == "builtin:mnist5k"
    assert params.finetune.lambda_gen >= 0


def test_every_param_is_in_params_yaml_and_declared_in_its_dvc_stage():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for group in dataclasses.fields(Params):
        declared = set(stages[STAGE_OF_GROUP[group.name]]["params"])
        for f in dataclasses.fields(getattr(Params(), group.name)):
            key = f"{group.name}.{f.name}"
            assert f.name in raw[group.name], f"{key} is missing from params.yaml"
            assert key in declared, f"{key} is not declared in dvc.yaml stage {STAGE_OF_GROUP[group.name]}"


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"pretrain": {"epochs": "ten"}}, "pretrain.epochs"),
        ({"pretrain": {"epochs": 0}}, "pretrain.epochs"),
        ({"finetune": {"lrr": 0.1}}, "finetune.lrr"),
        ({"model": {"n_embd": 100, "n_head": 3}}, "model.n_embd"),
        ({"prepare": {"color_mode": "cmyk"}}, "prepare.color_mode"),
        ({"prepare": {"val_fraction": 0.5, "test_fraction": 0.5}}, "prepare.val_fraction"),
        ({"ingest": {"source": "s3://bucket"}}, "ingest.source"),
        ({"ingest": {"source": "builtin:cifar"}}, "ingest.source"),
        ({"gate": {"min_accuracy": 1.5}}, "gate.min_accuracy"),
        ({"evaluate": {"svm_reference": "yes"}}, "evaluate.svm_reference"),
        ({"finetune": {"device": "tpu"}}, "finetune.device"),
        ({"trainer": {}}, "trainer"),
    ],
)
def test_bad_value_is_refused_naming_its_key(raw, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params(raw).check()


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ParamsError, match="no such file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_ints_are_accepted_where_floats_are_expected():
    assert parse_params({"pretrain": {"lr": 1}}).pretrain.lr == 1.0
