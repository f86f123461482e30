"""What a flow run shows in the Prefect UI, and how the flow reads a stage's output: fast, no Prefect server."""

import json

import pytest

from flows import artifacts
from tgm.orchestrate import BadOverride, StageFailed, parse_overrides, refusal


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested metrics as `dvc metrics diff` names them: keys joined by dots."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff_of(metrics: dict, change: float) -> dict:
    return {k: {"old": v - change, "new": v, "diff": change} for k, v in flatten(metrics).items()}


@pytest.mark.slow
def test_headline_metrics_exist_in_what_evaluate_writes_and_come_first(built_project):
    fresh = json.loads((built_project / "metrics" / "evaluate.json").read_text())  # what this code's evaluate wrote
    written = flatten(fresh)
    assert set(artifacts.HEADLINE) <= set(written), set(artifacts.HEADLINE) - set(written)
    markdown = artifacts.metrics_markdown(diff_of(fresh, 0.01))
    names = [line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| ")][1:]
    assert names[: len(artifacts.HEADLINE)] == artifacts.HEADLINE
    assert names[len(artifacts.HEADLINE) :] == sorted(names[len(artifacts.HEADLINE) :])
    assert "| accuracy |" in markdown and "+0.0100 |" in markdown


def test_no_previous_metrics_says_so():
    assert "No `metrics/evaluate.json` to compare" in artifacts.metrics_markdown({})


def test_stages_table_names_the_failure_by_its_first_line():
    results = [{"stage": "ingest", "ran": ["ingest"], "skipped": []}, {"stage": "validate", "ran": [], "skipped": []}]
    # `dvc repro package` reran the always-changed gate upstream of it, not package.
    results.append({"stage": "package", "ran": ["gate"], "skipped": ["package"]})
    md = artifacts.stages_markdown(results, ("gate", "gate failed: accuracy too low\nmore detail"), "prefect-x")
    assert "| ingest | ran |" in md and "| validate | up to date, skipped |" in md
    assert "| package | up to date, skipped |" in md
    assert "| gate | **failed**: gate failed: accuracy too low |" in md and "more detail" not in md
    assert "`prefect-x`" in md
    assert "Not recorded" in artifacts.stages_markdown(results, None, None)


GATE = {
    "passed": False,
    "checks": [
        {"name": "min_accuracy", "metric": "accuracy", "value": 0.8, "op": ">=", "threshold": 0.9, "passed": False},
        {
            "name": "max_regression",
            "metric": "macro_f1",
            "value": 0.95,
            "op": ">=",
            "threshold": 0.94,
            "passed": True,
            "why": "champion m:1 has 0.9500",
        },
    ],
    "task": {"id": "builtin-digits-0123abcd", "source": "builtin:digits", "classes": ["0", "1"]},
    "champion": {"model": "m:1", "promoted_at": "2026-11-29T01:00:00+00:00", "promoted_by": "Ada <ada@x>"},
}


def test_gate_report_shows_each_check_and_the_champion():
    md = artifacts.gate_markdown(GATE)
    assert "Decision: **failed**" in md
    assert "| gate.min_accuracy | accuracy | 0.8000 | >= 0.9000 | **FAIL** |" in md
    assert "| gate.max_regression | macro_f1 | 0.9500 | >= 0.9400 (champion m:1 has 0.9500) | pass |" in md
    assert "Task: `builtin-digits-0123abcd` (source `builtin:digits`, 2 classes)" in md
    assert "`m:1`, promoted 2026-11-29T01:00:00+00:00 by Ada <ada@x>" in md
    assert "this task has none yet" in artifacts.gate_markdown({**GATE, "champion": None})
    assert artifacts.gate_markdown(None) is None


def test_champion_report_lists_the_champion_first_then_the_earlier_ones():
    def entry(model, version, accuracy):
        return {
            "model": model,
            "version": version,
            "metrics": {"accuracy": accuracy},
            "promoted_at": "t",
            "promoted_by": "b",
            "how": "h",
        }

    promotion = {"task": "t1", "promoted": True, "why": "m:2: champion of t1 (pipeline)"}
    md = artifacts.champion_markdown(promotion, [entry("m:2", "v0.0.2", 0.97), entry("m:1", "v0.0.1", 0.95)])
    assert md.index("**`m:2`** (champion) | v0.0.2 | 0.9700") < md.index("| `m:1` | v0.0.1 | 0.9500")
    assert "promote: m:2: champion of t1 (pipeline)" in md
    assert "tgm champion rollback" in md and "git push --tags" in md
    assert artifacts.champion_markdown(promotion, []) is None and artifacts.champion_markdown(None, []) is None


def test_validation_report_lists_reasons_classes_and_problems():
    report = {
        "passed": False,
        "accepted": 8,
        "inputs": 10,
        "rejected": 2,
        "reject_fraction": 0.2,
        "classes": 2,
        "rejected_by_reason": {"truncated": 1, "not_an_image": 1},
        "images_per_class": {"a": 5, "b": 3},
        "problems": ["too many rejected"],
        "warnings": [],
    }
    md = artifacts.validation_markdown(report)
    assert "Validation **failed**: 8 of 10 files accepted, 2 quarantined (0.2000), 2 classes." in md
    assert md.index("| not_an_image | 1 |") < md.index("| truncated | 1 |")
    assert "| b | 3 |" in md and "- problem: too many rejected" in md


def write_reports(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "validation.json").write_text(json.dumps({"passed": True, "accepted": 1, "inputs": 1}))
    (tmp_path / "reports" / "gate.json").write_text(json.dumps(GATE))
    (tmp_path / "reports" / "package.json").write_text(json.dumps({"model_tag": "m:2", "bento_tag": "s:2"}))


def test_render_shows_only_reports_of_stages_this_run_reached(tmp_path):
    write_reports(tmp_path)
    results = [{"stage": "validate", "ran": [], "skipped": ["validate"]}]
    out = artifacts.render(tmp_path, results, ("gate", "gate failed"), None, {}, ran=set())
    assert set(out) == {"stages", "metrics", "validation", "gate"}  # package never ran: no stale report of it
    assert out["validation"].endswith("(up to date: this stage did not need to run.)")
    assert "up to date" not in out["gate"]  # the failing stage's report is what it just wrote
    done = [{"stage": s, "ran": [s], "skipped": []} for s in ("validate", "gate", "package")]
    out = artifacts.render(tmp_path, done, None, "e", {}, ran={"validate", "gate", "package"})
    assert "`bentoml serve s:2`" in out["package"] and "up to date" not in out["validation"]


def test_a_refusal_is_read_with_its_continuation_lines_and_a_crash_is_not_one():
    lines = [
        "Running stage 'validate':",
        "tgm validate: error: validation failed:",
        "  too many rejected",
        "  a class below its minimum",
        "ERROR: failed to reproduce 'validate'",
    ]
    assert refusal(lines) == "validation failed:\ntoo many rejected\na class below its minimum"
    failed = StageFailed("validate", 1, lines)
    assert failed.refusal and failed.reason == failed.refusal
    crash = StageFailed("pretrain", -9, ["epoch 3", "Killed"])
    assert crash.refusal is None and "Killed" in crash.reason


def test_overrides_parse_as_yaml_values():
    assert parse_overrides(
        [
            "finetune.lr=0.001",
            "study.fractions=[0.1, 0.5]",
            "gate.max_regression=null",
            "ingest.source=folder:data/sources/x",
            "package.build_bento=false",
        ]
    ) == {
        "finetune.lr": 0.001,
        "study.fractions": [0.1, 0.5],
        "gate.max_regression": None,
        "ingest.source": "folder:data/sources/x",
        "package.build_bento": False,
    }


@pytest.mark.parametrize("bad", ["finetune.lr", "lr=0.1", "a.b.c=1", ".lr=1", "finetune.lr=[1,"])
def test_a_malformed_override_is_refused_naming_it(bad):
    with pytest.raises(BadOverride, match="override"):
        parse_overrides([bad])


def test_drift_artifact_shows_the_verdict_the_numbers_and_both_distributions():
    from flows.drift import drift_markdown

    report = {
        "folder": "in",
        "passed": False,
        "files": 4,
        "scored": 3,
        "threshold_bpp": 1.4,
        "atypical": 1,
        "atypical_share": 1 / 3,
        "median_bpp": 1.2,
        "validation_median_bpp": 1.0,
        "ks_statistic": 0.41,
        "ks_p_value": 2e-5,
        "quantiles": {"p50": [1.2, 1.0], "p90": [3.1, 1.3]},
        "unreadable": {"truncated": 1},
        "problems": ["33.3% of the images are atypical"],
    }
    md = drift_markdown(report, None)
    assert "Folder `in`: **drift**. 3 of 4 files scored." in md
    assert "| atypical images (over 1.400 bits per pixel) | 1 (33.3%) |" in md
    assert "| Kolmogorov-Smirnov statistic (p) | 0.410 (2e-05) |" in md and "| p90 | 3.100 | 1.300 |" in md
    assert "- unreadable, truncated: 1" in md and "- problem: 33.3% of the images are atypical" in md
    assert drift_markdown({**report, "passed": True, "problems": []}, None).count("no drift") == 1
    assert drift_markdown(None, "drift.folder: in does not exist").endswith(
        "Not judged: drift.folder: in does not exist"
    )
