"""pandera contracts for the tables that pass between stages, checked where they cross a boundary."""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from tgm.errors import UserError


class DataContractError(UserError, ValueError):
    """A table handed between stages breaks its contract."""


class Manifest(pa.DataFrameModel):
    """One row per file that ingest found."""

    path: Series[str] = pa.Field(unique=True)
    label: Series[str] = pa.Field(nullable=True)
    split: Series[str] = pa.Field(isin=["", "train", "val", "test"])  # the user's split; "": none given
    pool: Series[str] = pa.Field()  # "": the labelled source; else the unlabelled pool's name
    entry: Series[str] = pa.Field(isin=["file", "symlink", "special"])
    sha256: Series[str] = pa.Field(str_matches=r"^[0-9a-f]{64}$")
    size_bytes: Series[int] = pa.Field(ge=0)
    format: Series[str] = pa.Field(nullable=True)
    width: Series[int] = pa.Field(ge=-1)
    height: Series[int] = pa.Field(ge=-1)
    mode: Series[str] = pa.Field(nullable=True)

    class Config:
        coerce = True


class AcceptedManifest(Manifest):
    """Images that passed validation, decodable: labelled ones each picture (sha256) once, and the unlabelled
    pools' each picture once among them (prepare sets aside a pooled copy of a labelled image)."""

    width: Series[int] = pa.Field(ge=1)
    height: Series[int] = pa.Field(ge=1)

    @pa.dataframe_check(error="a file of the labelled source has no label, or a pooled one has one")
    @classmethod
    def labelled_unless_pooled(cls, df: pd.DataFrame) -> pd.Series:
        return (df["label"] != "") == (df["pool"] == "")

    @pa.dataframe_check(error="the same picture (sha256) is accepted twice in the labelled source or the pools")
    @classmethod
    def each_picture_once(cls, df: pd.DataFrame) -> bool:
        return not df.assign(labelled=df["pool"] == "").duplicated(["sha256", "labelled"]).any()


class SplitTable(pa.DataFrameModel):
    """Which accepted image went to which split."""

    path: Series[str] = pa.Field(unique=True)
    label: Series[str] = pa.Field(str_length={"min_value": 1})
    sha256: Series[str] = pa.Field(str_matches=r"^[0-9a-f]{64}$")
    split: Series[str] = pa.Field(isin=["train", "val", "test"])

    class Config:
        coerce = True

    @pa.dataframe_check(error="the same image (sha256) appears in more than one split")
    @classmethod
    def no_image_in_two_splits(cls, df: pd.DataFrame) -> bool:
        return bool((df.groupby("sha256")["split"].nunique() <= 1).all())

    @pa.dataframe_check(error="near-duplicate images (one group) are spread over more than one split")
    @classmethod
    def no_near_duplicate_group_in_two_splits(cls, df: pd.DataFrame) -> bool:
        if "group" not in df:
            return True
        return bool((df.groupby("group")["split"].nunique() <= 1).all())


def check(model: type[pa.DataFrameModel], df: pd.DataFrame, what: str) -> pd.DataFrame:
    """Validate `df` against `model`; raise DataContractError listing the first failures."""
    try:
        blanks = {c: "" for c in ("label", "split", "pool", "format", "mode") if c in df}
        return model.validate(df.fillna(blanks), lazy=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases[["column", "check", "failure_case"]].head(10)
        lines = [f"  {r.column or '(table)'}: {r.check} failed for {r.failure_case!r}" for r in cases.itertuples()]
        raise DataContractError(
            f"{what} breaks its contract ({len(exc.failure_cases)} failures):\n" + "\n".join(lines)
        ) from None
