"""Reading tables and drawing fixed samples: what every data source (classification tables,
chats) shares, so each loader states only what is its own."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from declora.errors import DataError

FILE_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")

#: One tokenized example: input_ids, attention_mask and a label (classification) or per-token
#: labels (causal LM). The one definition the data, task and engine code share.
Example = dict[str, Any]


@dataclass(frozen=True)
class Options:
    """Split and subsample settings shared by every loader."""

    test_size: float
    split_seed: int
    dedupe: bool
    max_train: int | None
    max_test: int | None
    val_size: float | None = None


def check_options(
    test_size: float, max_train: int | None, max_test: int | None, val_size: float | None = None
) -> None:
    """Catch impossible settings before reading any file."""
    if not 0 < test_size < 1:
        raise DataError(f"data.test_size must be between 0 and 1 (exclusive); got {test_size}")
    if val_size is not None and not 0 < val_size < 1:
        raise DataError(f"data.val_size must be between 0 and 1 (exclusive); got {val_size}")
    for key, value in (("max_train_examples", max_train), ("max_test_examples", max_test)):
        if value is not None and value < 1:
            raise DataError(f"data.{key} must be >= 1 or unset; got {value}")


def check_table_path(path: Path, key: str = "data.path") -> None:
    """Refuse a table path that is not a file or whose extension no reader takes. Cheap (the
    file is not opened), so a run refuses it before it is announced."""
    if not path.is_file():
        raise DataError(f"{key} {path} does not exist (or is not a file)")
    ext = path.suffix.lower()
    if ext not in FILE_EXTENSIONS:
        raise DataError(
            f"{key} {path} has unsupported extension {ext or '(none)'!r}; "
            f"accepted: {', '.join(FILE_EXTENSIONS)}"
        )


def read_table(path: Path, key: str = "data.path") -> pd.DataFrame:
    """Read a local table chosen by extension; text stays text (no NA guessing)."""
    check_table_path(path, key)
    ext = path.suffix.lower()
    try:
        frame = read_by_extension(path, ext)
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{key} {path} is empty; it needs a header and data rows") from err
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise DataError(f"{key} {path} could not be read as {ext[1:]}: {one_line(err)}") from err
    if len(frame) == 0:
        raise DataError(f"{key} {path} has no data rows")
    return frame


def one_line(err: BaseException) -> str:
    """The CLI prints errors as one line; library messages may span several."""
    return " ".join(str(err).split())


def read_by_extension(path: Path, ext: str) -> pd.DataFrame:
    if ext == ".parquet":
        return pd.read_parquet(path)
    if ext in (".json", ".jsonl"):
        if path.stat().st_size == 0:
            raise pd.errors.EmptyDataError("empty file")
        return pd.read_json(path, lines=ext == ".jsonl", dtype=False)
    # TSV is read literally, as GLUE writes it: quote characters are part of the text.
    quoting = csv.QUOTE_NONE if ext == ".tsv" else csv.QUOTE_MINIMAL
    sep = "\t" if ext == ".tsv" else ","
    kwargs = {"sep": sep, "quoting": quoting, "dtype": str, "keep_default_na": False}
    try:
        return pd.read_csv(path, encoding="utf-8", **kwargs)
    except UnicodeDecodeError:
        return pd.read_csv(path, encoding="latin-1", **kwargs)


def is_missing(value: object) -> bool:
    """None, NaN, pd.NA and NaT; anything pandas cannot test (lists) counts as present."""
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def stratified_pick(labels: np.ndarray, size: int | float, seed: int) -> np.ndarray:
    """Sorted indices of a stratified sample of ``size`` (count or fraction), seeded.

    Falls back to a plain random sample when stratification is impossible (a class with
    fewer than two examples, or fewer picks than classes).
    """
    idx = np.arange(len(labels))
    try:
        _, picked = train_test_split(idx, test_size=size, random_state=seed, stratify=labels)
    except ValueError:
        _, picked = train_test_split(idx, test_size=size, random_state=seed)
    return np.sort(picked)


def cap(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Indices of a stratified subsample of at most ``limit`` rows (all rows if unset)."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    return stratified_pick(labels, limit, seed)
