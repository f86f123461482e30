"""params.yaml is checked once, with errors that name the key; every parameter is taken by a stage."""

import pytest
import yaml
from conftest import ROOT, merge

from tgm.params import Params, ParamsError, ParamsOverride, load_params, override_pairs, parse_params

PROJECT = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_project_params_load_and_pass_their_checks():
    params = load_params(ROOT / "params.yaml")
    # Every value comes from the file as written: nothing is defaulted, dropped or converted on the way in.
    assert params.model_dump(mode="json") == PROJECT


def test_every_param_is_in_params_yaml_and_taken_by_a_stage():
    # dvc.yaml declaring what each stage takes is tests/test_dvc_deps.py's check, against tgm/stages.py.
    from tgm.stages import STAGES

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    taken = {spec.partition(".")[0] for stage in STAGES.values() for spec in stage.params}
    for group, info in Params.model_fields.items():
        assert group in taken, f"no stage takes params group {group}"
        for name in info.annotation.model_fields:
            assert name in raw[group], f"{group}.{name} is missing from params.yaml"


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
        parse_params(merge(PROJECT, raw))


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ParamsError, match="no such file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_ints_are_accepted_where_floats_are_expected():
    value = parse_params(merge(PROJECT, {"finetune": {"lambda_gen": 1}})).finetune.lambda_gen
    assert value == 1.0 and isinstance(value, float)


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"pretrain": {"epochs": 3.0}}, "pretrain.epochs"),  # no silent float -> int
        ({"pretrain": {"compile": 1}}, "pretrain.compile"),  # no 1 for true
        ({"pretrain": {"lr": "0.001"}}, "pretrain.lr"),  # no strings for numbers
        ({"study": {"knn_k": [1, 2.5]}}, "study.knn_k.1"),
        ({"finetune": {"grad_accum": 64}}, "finetune.grad_accum"),  # more micro-batches than the batch
    ],
)
def test_types_are_strict(raw, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params(merge(PROJECT, raw))


def test_a_missing_key_is_refused_not_defaulted():
    raw = merge(PROJECT, {})
    del raw["finetune"]["lambda_gen"]
    with pytest.raises(ParamsError, match=r"finetune\.lambda_gen: missing"):
        parse_params(raw)


def test_the_flow_form_sets_only_what_is_filled_in():
    form = ParamsOverride.model_validate({"finetune": {"lr": 0.01}, "study": {"fractions": [0.1]}})
    assert override_pairs(form) == {"finetune.lr": 0.01, "study.fractions": [0.1]}
    assert override_pairs(ParamsOverride()) == {}
    assert set(ParamsOverride.model_json_schema()["properties"]) == set(Params.model_fields)
    with pytest.raises(ValueError, match="lrr"):
        ParamsOverride.model_validate({"finetune": {"lrr": 0.01}})
