"""The Great Expectations suites that judge the data, run in code on an ephemeral GX context.

Row expectations run over the inspected manifest (one row per input file); each carries the quarantine
reason it stands for, and their order is the order in which a file's reason is chosen. Class expectations run
over the per-class table. Data Docs (HTML) are written to `docs_dir`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tgm.params import ValidateParams

log = logging.getLogger(__name__)

ALLOWED_MODES = [
    "1",
    "L",
    "LA",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBX",
    "CMYK",
    "YCbCr",
    "I",
    "I;16",
    "I;16B",
    "I;16L",
    "La",
    "RGBa",
]


@dataclass(frozen=True)
class RowRule:
    reason: str  # quarantine code given to the files this expectation rejects
    expectation: object
    severity: str = "reject"  # "reject" or "flag" (reported, file kept)


def row_rules(params: ValidateParams, classes: list[str]) -> list[RowRule]:
    import great_expectations as gx

    E = gx.expectations
    return [
        RowRule("unlabelled", E.ExpectColumnValuesToNotBeNull(column="label")),
        RowRule("system_file", E.ExpectColumnValuesToBeInSet(column="is_hidden", value_set=[False])),
        RowRule("not_a_regular_file", E.ExpectColumnValuesToBeInSet(column="entry", value_set=["file"])),
        RowRule("undecodable", E.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True])),
        RowRule("unknown_label", E.ExpectColumnValuesToBeInSet(column="label", value_set=classes)),
        RowRule(
            "format_not_allowed", E.ExpectColumnValuesToBeInSet(column="format", value_set=list(params.allowed_formats))
        ),
        RowRule("mode_not_supported", E.ExpectColumnValuesToBeInSet(column="mode", value_set=ALLOWED_MODES)),
        RowRule("too_small", E.ExpectColumnValuesToBeBetween(column="min_side", min_value=params.min_side)),
        RowRule("bad_aspect_ratio", E.ExpectColumnValuesToBeBetween(column="aspect", max_value=params.max_aspect)),
        RowRule("conflicting_labels", E.ExpectColumnValuesToBeInSet(column="label_conflict", value_set=[False])),
        RowRule("duplicate", E.ExpectColumnValuesToBeNull(column="duplicate_of")),
        RowRule(
            "near_constant",
            E.ExpectColumnValuesToBeBetween(column="pixel_std", min_value=params.near_constant_std),
            severity="flag",
        ),
    ]


def class_expectations(params: ValidateParams) -> list:
    import great_expectations as gx

    E = gx.expectations
    return [
        E.ExpectTableRowCountToBeBetween(min_value=2),
        E.ExpectColumnValuesToBeBetween(column="images", min_value=params.min_images_per_class),
        E.ExpectColumnValuesToBeBetween(column="imbalance", max_value=params.max_class_imbalance),
    ]


class GXRunner:
    """One ephemeral GX context; each suite run adds its results to the Data Docs in `docs_dir` (None: none)."""

    def __init__(self, docs_dir: Path | None):
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.gx, self.docs_dir = gx, docs_dir
        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        # An ephemeral context comes with a docs site in a fresh temporary directory; drop it so that no
        # run leaves copies of the Data Docs behind in /tmp.
        for name, site in dict(self.ctx.list_data_docs_sites()).items():
            base = site.get("store_backend", {}).get("base_directory")
            self.ctx.delete_data_docs_site(name)
            if base and Path(base).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve()):
                shutil.rmtree(base, ignore_errors=True)
        if docs_dir is not None:
            self.ctx.add_data_docs_site(
                "tgm",
                {
                    "class_name": "SiteBuilder",
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                    "store_backend": {
                        "class_name": "TupleFilesystemStoreBackend",
                        "base_directory": str(Path(docs_dir).resolve()),
                    },
                },
            )
        self.source = self.ctx.data_sources.add_pandas("tgm")

    def run(self, name: str, df: pd.DataFrame, expectations: list, index_column: str) -> list:
        """The expectations' results over `df`, unexpected rows named by `index_column`."""
        gx = self.gx
        batch = self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = self.ctx.suites.add(gx.ExpectationSuite(name=f"tgm_{name}"))
        for e in expectations:
            suite.add_expectation(e)
        vd = self.ctx.validation_definitions.add(gx.ValidationDefinition(name=f"tgm_{name}", data=batch, suite=suite))
        actions = (
            [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["tgm"])] if self.docs_dir is not None else []
        )
        checkpoint = self.ctx.checkpoints.add(
            gx.Checkpoint(
                name=f"tgm_{name}",
                validation_definitions=[vd],
                actions=actions,
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [index_column]},
            )
        )
        result = checkpoint.run(batch_parameters={"dataframe": df})
        return next(iter(result.run_results.values())).results


# What an unlabelled pool's files are not judged on: they have no label by design.
LABEL_RULES = ("unlabelled", "unknown_label", "conflicting_labels")


class Suites(GXRunner):
    """The row and class suites of validate, in one context; the files of unlabelled pools are judged by the
    row rules that do not concern labels, in a suite of their own."""

    def __init__(self, params: ValidateParams, classes: list[str], docs_dir: Path | None):
        super().__init__(docs_dir)
        self.params, self.classes = params, classes
        self.rules = row_rules(params, classes)  # in priority order: a file's reason is its first failed rule
        self.pool_rules = [r for r in row_rules(params, classes) if r.reason not in LABEL_RULES]

    def check_rows(self, rows: pd.DataFrame, pool: bool = False) -> tuple[dict[str, list[str]], list[dict]]:
        """Paths each row rule rejects (or flags), keyed by reason in rule order; and summaries. `pool`: the
        rows are an unlabelled pool's, judged by `self.pool_rules`."""
        rules = self.pool_rules if pool else self.rules
        table = "pool" if pool else "manifest"
        for rule in rules:
            # GX does not keep the suite's order in its results; the reason travels in each expectation's meta.
            rule.expectation.meta = {"reason": rule.reason, "severity": rule.severity}
        by_reason = {r.reason: r for r in rules}
        failed: dict[str, list[str]] = {r.reason: [] for r in rules}
        summaries = []
        for res in self.run(table, rows, [r.expectation for r in rules], "path"):
            rule = by_reason[res.expectation_config.meta["reason"]]
            paths = [u["path"] for u in res.result.get("unexpected_index_list") or []]
            failed[rule.reason] = paths
            summaries.append(
                {
                    "table": table,
                    "expectation": res.expectation_config.type,
                    "column": res.expectation_config.kwargs.get("column"),
                    "reason": rule.reason,
                    "severity": rule.severity,
                    "success": bool(res.success),
                    "unexpected": len(paths),
                    "examples": paths[:5],
                }
            )
        return failed, summaries

    def check_classes(self, table: pd.DataFrame) -> list[dict]:
        summaries = []
        for res in self.run("classes", table, class_expectations(self.params), "label"):
            bad = [u["label"] for u in res.result.get("unexpected_index_list") or []]
            summaries.append(
                {
                    "table": "classes",
                    "expectation": res.expectation_config.type,
                    "column": res.expectation_config.kwargs.get("column"),
                    "success": bool(res.success),
                    "unexpected": len(bad),
                    "examples": bad[:5],
                }
            )
        return summaries

    @property
    def docs_index(self) -> str | None:
        if self.docs_dir is None or not (Path(self.docs_dir) / "index.html").exists():
            return None
        return str(Path(self.docs_dir) / "index.html")
