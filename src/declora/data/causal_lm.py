"""Data for causal-LM runs (instruction tuning or plain language modelling).

Loading gives a tokenizer-free :class:`LMData` (chat conversations or text documents, already
split); tokenization (loss masks, packing, generation prompts) happens once, before training.
Splits are seeded by ``split_seed`` alone, so the test set stays fixed while the run seed varies.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from declora.data.tables import (
    FILE_EXTENSIONS,
    Example,
    Options,
    cap,
    check_options,
    is_missing,
    one_line,
    read_table,
    stratified_pick,
)
from declora.errors import DataError

LM_DATASET_NAMES = ("chatterbot", "file", "text")
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label value that cross-entropy skips
CHATTERBOT_PIN = "chatterbot-corpus==1.3.3"
NO_GROUP = "all"

Message = dict[str, str]
Conversation = list[Message]

# Plain format for tokenizers without a chat template; assistant content + eos is trained.
FALLBACK_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}

_BLANK_LINES = re.compile(r"\n[ \t\f\v]*\n")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C build of safe_load


@dataclass
class LMData:
    """Conversations (``kind="chat"``) or documents (``kind="text"``), split into train/test.

    ``train_labels`` holds a group code per train example so the classification partitioners
    (label skew, Dirichlet) can spread groups unevenly over the peers.
    """

    kind: str
    train: list[Conversation] | list[str]
    test: list[Conversation] | list[str]
    train_labels: np.ndarray
    group_names: list[str]
    source: str

    def summary(self) -> dict:
        """Sizes and per-group train counts, for logs and the run report (JSON-able)."""
        counts = np.bincount(self.train_labels, minlength=len(self.group_names))
        return {
            "kind": self.kind,
            "train_size": len(self.train),
            "test_size": len(self.test),
            "groups": {name: int(n) for name, n in zip(self.group_names, counts, strict=True)},
            "source": self.source,
        }


def check_lm_dataset_name(name: str) -> None:
    """Refuse an unknown causal-LM source by name, before anything is loaded."""
    if name not in LM_DATASET_NAMES:
        raise DataError(f"unknown LM data set {name!r}; accepted: {', '.join(LM_DATASET_NAMES)}")


def check_lm_dataset_source(
    name: str, path: str | None, test_path: str | None, group_column: str | None
) -> None:
    """Refuse a source that cannot be read as given: an unknown name, a path it needs but was
    not given, an option it would ignore, or a path that does not exist. Cheap (no file is
    read), so a run can refuse before it is announced; the loader makes the same checks."""
    check_lm_dataset_name(name)
    if name == "chatterbot":
        given = {"path": path, "test_path": test_path, "group_column": group_column}
        for key, value in given.items():
            if value is not None:
                raise DataError(
                    f"data.{key} does not apply to chatterbot (built in, split by data.split_seed, "
                    "grouped by its categories); "
                    "unset it or use data.name=file"
                )
        return
    if path is None:
        raise DataError(f"data.name={name} needs data.path=<{_path_hint(name)}>")
    for key, value in (("data.path", path), ("data.test_path", test_path)):
        if value is None:
            continue
        given = Path(value)
        if not given.exists():
            raise DataError(f"{key} {value} does not exist; expected {_path_hint(name)}")
        if name == "text" and (given.is_dir() or given.suffix.lower() == ".txt"):
            continue
        if not given.is_file() or given.suffix.lower() not in FILE_EXTENSIONS:
            raise DataError(f"{key} {value} is not {_path_hint(name)}")


def load_lm_data(
    name: str,
    *,
    path: str | None = None,
    test_path: str | None = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    messages_column: str = "messages",
    text_column: str = "text",
    group_column: str | None = None,
    test_size: float = 0.1,
    split_seed: int = 0,
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
    dedupe: bool = True,
) -> LMData:
    """Load a causal-LM data set by name: ``chatterbot``, ``file`` or ``text``.

    ``file`` reads a table with a messages column (preferred when present) or prompt/response
    columns; ``text`` reads a .txt file (documents split on blank lines), a folder of .txt files
    (one document each) or a table with ``text_column``. With ``dedupe`` identical examples are
    dropped before splitting, so none lands in both train and test. ``group_column`` applies
    to tables only; chatterbot's groups are its categories.
    """
    check_options(test_size, max_train_examples, max_test_examples)
    check_lm_dataset_source(name, path, test_path, group_column)
    if name == "chatterbot":
        examples, groups = _load_chatterbot()
        test_examples, source = None, "chatterbot"
    else:
        assert path is not None  # check_lm_dataset_source refused a missing data.path
        cols = _Columns(prompt_column, response_column, messages_column, text_column)
        examples, groups = _read_source(name, Path(path), cols, group_column, "data.path")
        test_examples = None
        if test_path is not None:
            test_examples, _ = _read_source(name, Path(test_path), cols, None, "data.test_path")
        source = path if test_path is None else f"{path} (test: {test_path})"
    return _assemble(
        "text" if name == "text" else "chat",
        examples,
        groups,
        test_examples,
        Options(test_size, split_seed, dedupe, max_train_examples, max_test_examples),
        source,
    )


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class _Columns:
    """User column names of a table source."""

    prompt: str
    response: str
    messages: str
    text: str


def _path_hint(name: str) -> str:
    tables = ", ".join(FILE_EXTENSIONS)
    if name == "text":
        return f"a .txt file, a folder of .txt files, or a {tables} file"
    return f"a {tables} file"


# --------------------------------------------------------------------------- chatterbot


def _load_chatterbot() -> tuple[list[Conversation], list[str]]:
    """The English chatterbot corpus: one group per file (its first category)."""
    conversations: list[Conversation] = []
    groups: list[str] = []
    for yml in _chatterbot_files():
        try:
            doc = yaml.load(yml.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
        except yaml.YAMLError as err:
            raise DataError(
                f"chatterbot file {yml.name} is not valid YAML: {one_line(err)}"
            ) from err
        if not isinstance(doc, dict):
            continue
        categories = doc.get("categories") or [yml.stem]
        category = str(categories[0]) if isinstance(categories, list) else str(categories)
        for raw in doc.get("conversations") or []:
            messages = _chatterbot_conversation(raw)
            if messages is not None:
                conversations.append(messages)
                groups.append(category)
    if not conversations:
        raise DataError("the chatterbot corpus holds no conversation with an answered question")
    return conversations, groups


def _chatterbot_files() -> list[Path]:
    """Locate the English YAML files without importing chatterbot_corpus."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"data set 'chatterbot' needs the corpus wheel; pip install --no-deps {CHATTERBOT_PIN}"
        )
    folder = Path(spec.submodule_search_locations[0]) / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise DataError(
            f"the chatterbot corpus has no English files in {folder}; "
            f"reinstall it: pip install --no-deps {CHATTERBOT_PIN}"
        )
    return files


def _chatterbot_conversation(raw: object) -> Conversation | None:
    """Alternating user/assistant turns, or None when unusable.

    A bare string is a one-turn entry (trivia.yml has one, a YAML indentation slip) and is
    dropped like any unanswered question; turns that are not text or numbers void the entry.
    """
    if not isinstance(raw, list):
        return None
    turns = []
    for value in raw:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            return None  # YAML 1.1 booleans (yes/no) cannot be turned back into the text
        text = str(value).strip()
        if not text:
            return None
        turns.append(text)
    turns = turns[: len(turns) - len(turns) % 2]  # a trailing question has no answer
    if not turns:
        return None
    return [{"role": ROLES[1 + i % 2], "content": t} for i, t in enumerate(turns)]


# --------------------------------------------------------------------------- files


def _read_source(
    name: str, path: Path, cols: _Columns, group_column: str | None, key: str
) -> tuple[list[Conversation] | list[str], list[str] | None]:
    """Examples (and groups, if a group column is given) of one file or folder."""
    if name == "text" and path.is_dir():
        _no_group_in_plain_text(group_column)
        return _read_text_folder(path, key), None
    if name == "text" and path.suffix.lower() == ".txt":
        _no_group_in_plain_text(group_column)
        return _split_documents(_read_text_file(path, key), path), None
    if not path.exists():
        raise DataError(f"{key} {path} does not exist; expected {_path_hint(name)}")
    frame = read_table(path, key)
    available = ", ".join(str(c) for c in frame.columns)
    groups = None
    if group_column is not None:
        _require(frame, group_column, "group_column", path, available)
        groups = frame[group_column].tolist()
    if name == "text":
        _require(frame, cols.text, "text_column", path, available)
        return _rows_to_documents(frame[cols.text].tolist(), groups, group_column, path)
    if cols.messages in frame.columns:
        conversations = [
            _parse_messages(v, f"row {i + 1} of {path}") for i, v in enumerate(frame[cols.messages])
        ]
    elif cols.prompt in frame.columns or cols.response in frame.columns:
        _require(frame, cols.prompt, "prompt_column", path, available)
        _require(frame, cols.response, "response_column", path, available)
        pairs = zip(frame[cols.prompt], frame[cols.response], strict=True)
        conversations = [_prompt_response(p, r) for p, r in pairs]
    else:
        raise DataError(
            f"{path} needs a {cols.messages!r} column (data.messages_column) or "
            f"{cols.prompt!r} and {cols.response!r} columns (data.prompt_column, "
            f"data.response_column); columns are: {available}"
        )
    return _drop_empty(conversations, groups, path, group_column)


def _require(frame: pd.DataFrame, column: str, key: str, path: Path, available: str) -> None:
    if column not in frame.columns:
        raise DataError(f"data.{key} {column!r} not in {path}; columns are: {available}")


def _no_group_in_plain_text(group_column: str | None) -> None:
    if group_column is not None:
        raise DataError(
            "data.group_column needs a table (csv, jsonl, ...); .txt files have no columns"
        )


def _read_text_file(path: Path, key: str) -> str:
    if not path.is_file():
        raise DataError(f"{key} {path} does not exist; expected {_path_hint('text')}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_text_folder(folder: Path, key: str) -> list[str]:
    """One document per .txt file, in file-name order; empty files are skipped."""
    files = sorted(folder.glob("*.txt"))
    if not files:
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:20]) or "nothing"
        raise DataError(f"{key} folder {folder} has no .txt files; it holds: {found}")
    docs = [_read_text_file(f, key).strip() for f in files]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"{key} folder {folder} has only empty .txt files")
    return docs


def _split_documents(text: str, path: Path) -> list[str]:
    """A single file holds one document per blank-line separated block."""
    docs = [block.strip() for block in _BLANK_LINES.split(text)]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"{path} is empty; it needs documents separated by blank lines")
    return docs


def _rows_to_documents(
    values: list, groups: list | None, group_column: str | None, path: Path
) -> tuple[list[str], list[str] | None]:
    """Non-empty text cells of a table become documents."""
    keep = [i for i, v in enumerate(values) if not is_missing(v) and str(v).strip()]
    docs = [str(values[i]).strip() for i in keep]
    if not docs:
        raise DataError(f"the text column of {path} holds no non-empty text")
    kept_groups = None if groups is None else [groups[i] for i in keep]
    _check_groups(kept_groups, group_column, path)
    return docs, kept_groups


def _check_groups(groups: list | None, group_column: str | None, path: Path) -> None:
    """Partitioners need a group for every example."""
    if groups is not None and any(is_missing(g) or not str(g).strip() for g in groups):
        raise DataError(
            f"data.group_column {group_column!r} has empty cells in {path}; "
            "every row with text needs a group"
        )


def _prompt_response(prompt: object, response: object) -> Conversation | None:
    """One user turn answered by one assistant turn; None when either is empty."""
    texts = ["" if is_missing(v) else str(v).strip() for v in (prompt, response)]
    if not all(texts):
        return None
    return [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[1]}]


def _parse_messages(value: object, where: str) -> Conversation | None:
    """A list of {role, content} dicts (a JSON string in CSV/TSV); None when the cell is empty.

    Messages after the last assistant turn are dropped: they have nothing to learn.
    """
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(
                f"messages in {where} are not valid JSON ({err.msg}); expected a JSON list "
                'like [{"role": "user", "content": "..."}, {"role": "assistant", ...}]'
            ) from err
    if isinstance(value, np.ndarray | tuple):  # parquet gives arrays of dicts
        value = list(value)
    if not isinstance(value, list):
        if is_missing(value):
            return None
        raise DataError(
            f"messages in {where} are a {type(value).__name__}; expected a list of "
            "{role, content} dicts"
        )
    if not value:
        return None
    messages = [_parse_message(m, where) for m in value]
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise DataError(f"messages in {where} have no assistant turn; at least one is needed")
    return messages[: assistant[-1] + 1]


def _parse_message(message: object, where: str) -> Message:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DataError(
            f"a message in {where} is {_short(message)}; each must be a dict with "
            "'role' and 'content'"
        )
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise DataError(
            f"a message in {where} has role {_short(role)}; accepted roles: {', '.join(ROLES)}"
        )
    if not isinstance(content, str):
        raise DataError(
            f"a {role} message in {where} has content {_short(content)}; content must be a string"
        )
    return {"role": role, "content": content}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _drop_empty(
    conversations: list[Conversation | None],
    groups: list | None,
    path: Path,
    group_column: str | None,
) -> tuple[list[Conversation], list[str] | None]:
    keep = [i for i, c in enumerate(conversations) if c is not None]
    if not keep:
        raise DataError(f"{path} has no rows with a non-empty conversation")
    kept_groups = None if groups is None else [groups[i] for i in keep]
    _check_groups(kept_groups, group_column, path)
    return [c for c in conversations if c is not None], kept_groups


# --------------------------------------------------------------------------- splitting


def _dedupe(examples: list, groups: list[str] | None) -> tuple[list, list[str] | None]:
    """Keep the first of identical examples (same messages or same document)."""
    seen: set = set()
    keep = []
    for i, ex in enumerate(examples):
        key = ex if isinstance(ex, str) else tuple((m["role"], m["content"]) for m in ex)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return [examples[i] for i in keep], None if groups is None else [groups[i] for i in keep]


def _assemble(
    kind: str,
    examples: list,
    groups: list[str] | None,
    test_examples: list | None,
    opts: Options,
    source: str,
) -> LMData:
    """Dedupe, encode groups, split (unless a test set was given), cap, package."""
    if opts.dedupe:
        examples, groups = _dedupe(examples, groups)
        if test_examples is not None:
            test_examples, _ = _dedupe(test_examples, None)
    names = [NO_GROUP] if groups is None else sorted({str(g).strip() for g in groups})
    index = {n: i for i, n in enumerate(names)}
    codes = np.array(
        [0] * len(examples) if groups is None else [index[str(g).strip()] for g in groups],
        dtype=np.int64,
    )
    if test_examples is None:
        if len(examples) < 2:
            raise DataError(f"{source} has {len(examples)} usable example(s); a split needs 2")
        test_idx = stratified_pick(codes, opts.test_size, opts.split_seed)
        train_mask = np.ones(len(examples), dtype=bool)
        train_mask[test_idx] = False
        test_examples = [examples[i] for i in test_idx]
        examples = [examples[i] for i in np.flatnonzero(train_mask)]
        codes = codes[train_mask]
    keep_train = cap(codes, opts.max_train, opts.split_seed)
    test_codes = np.zeros(len(test_examples), dtype=np.int64)
    keep_test = cap(test_codes, opts.max_test, opts.split_seed)
    return LMData(
        kind=kind,
        train=[examples[i] for i in keep_train],
        test=[test_examples[i] for i in keep_test],
        train_labels=codes[keep_train],
        group_names=names,
        source=source,
    )


# --------------------------------------------------------------------------- tokenization


def tokenize_chat(
    tokenizer: Any, conversations: Sequence[Conversation], max_length: int
) -> tuple[list[Example], dict[str, int]]:
    """Input ids and labels per conversation; only assistant turns (and their end) are trained.

    Each rendered segment is tokenized on its own, the way a prompt is tokenized at generation
    time, so the trained tokens are exactly what the model must produce after the prompt.
    Examples are cut at ``max_length`` from the right; those left without a trained token are
    dropped. Stats: ``truncated`` (examples cut, dropped ones included) and ``dropped``.
    """
    per_conv = [_segments(tokenizer, conv) for conv in conversations]
    ids = iter(_encode(tokenizer, [seg.text for segs in per_conv for seg in segs]))
    examples: list[Example] = []
    truncated = dropped = 0
    for segs in per_conv:
        input_ids: list[int] = []
        labels: list[int] = []
        for seg in segs:
            piece = next(ids) + list(seg.tail)
            input_ids.extend(piece)
            labels.extend(piece if seg.trained else [IGNORE_INDEX] * len(piece))
        if len(input_ids) > max_length:
            truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples, {"truncated": truncated, "dropped": dropped}


def pack_text(tokenizer: Any, documents: Sequence[str], block_size: int) -> list[Example]:
    """Documents joined by eos and cut into full blocks (the last partial block is dropped)."""
    eos = _eos_id(tokenizer, "packing documents")
    stream: list[int] = []
    for ids in _encode(tokenizer, list(documents)):
        stream.extend(ids)
        stream.append(eos)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise DataError(
            f"the documents give {len(stream)} tokens, fewer than one block of "
            f"{block_size}; lower the block size (max_length) or add text"
        )
    blocks = [stream[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def generation_prompts(
    tokenizer: Any, conversations: Sequence[Conversation], max_length: int
) -> list[tuple[list[int], str]]:
    """(prompt ids, reference answer) per conversation: everything before the last assistant turn.

    The prompt is tokenized piece by piece exactly as in :func:`tokenize_chat`, so the model
    sees at evaluation what preceded its answers in training. Prompts keep their last
    ``max_length`` tokens: the end (latest question, generation prompt) matters most.
    """
    per_conv, refs = [], []
    for conv in conversations:
        last = _assistant_turns(conv)[-1]
        segs = _segments(tokenizer, conv[: last + 1])
        answer = max(i for i, seg in enumerate(segs) if seg.trained)
        per_conv.append(segs[:answer])
        refs.append(conv[last]["content"])
    ids = iter(_encode(tokenizer, [seg.text for segs in per_conv for seg in segs]))
    out = []
    for segs, ref in zip(per_conv, refs, strict=True):
        prompt = [t for seg in segs for t in [*next(ids), *seg.tail]]
        out.append((prompt[-max_length:], ref))
    return out


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _assistant_turns(conv: Conversation) -> list[int]:
    turns = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    if not turns:
        raise DataError("a conversation has no assistant turn; at least one is needed")
    return turns


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added (templates write their own)."""
    if not texts:
        return []
    return [
        list(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    ]


def _eos_id(tokenizer: Any, purpose: str) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(
            f"{purpose} needs a tokenizer with an eos token; this one has none "
            "(set tokenizer.eos_token or use a causal-LM tokenizer)"
        )
    return int(eos)


def _render(tokenizer: Any, messages: Conversation, generation_prompt: bool) -> str:
    """The chat template as text; tokenizing it separately avoids transformers 5 returning
    a BatchEncoding (not a list) from ``apply_chat_template(tokenize=True)``."""
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja errors raised by the template itself land here
        raise DataError(
            f"the tokenizer's chat template failed on a conversation: {one_line(err)}"
        ) from err
    if not isinstance(text, str):
        raise DataError(f"the chat template rendered a {type(text).__name__}, expected a string")
    return text


def _fallback_turn(message: Message) -> str:
    """A user or system turn of the plain format."""
    return FALLBACK_PREFIX[message["role"]] + message["content"] + "\n"


@dataclass(frozen=True)
class _Segment:
    """A piece of a rendered conversation; ``tail`` ids follow its text (the fallback's eos)."""

    text: str
    trained: bool
    tail: tuple[int, ...] = ()


def _segments(tokenizer: Any, conv: Conversation) -> list[_Segment]:
    """The conversation as consecutive pieces; the trained ones are the assistant answers."""
    turns = _assistant_turns(conv)
    if not _has_template(tokenizer):
        eos = _eos_id(tokenizer, "the plain chat format (no chat template)")
        segs = []
        for m in conv:
            if m["role"] == "assistant":
                segs.append(_Segment(FALLBACK_PREFIX["assistant"], False))
                segs.append(_Segment(m["content"], True, (eos,)))
            else:
                segs.append(_Segment(_fallback_turn(m), False))
        return segs
    segs, done = [], ""
    for k in turns:
        prefix = _render(tokenizer, conv[:k], True)
        upto = _render(tokenizer, conv[: k + 1], False)
        if not prefix.startswith(done) or not upto.startswith(prefix):
            raise DataError(_prefix_error(k))
        segs.append(_Segment(prefix[len(done) :], False))
        segs.append(_Segment(upto[len(prefix) :], True))
        done = upto
    full = _render(tokenizer, conv, False)
    if not full.startswith(done):
        raise DataError(_prefix_error(len(conv) - 1))
    segs.append(_Segment(full[len(done) :], False))
    return segs


def _prefix_error(turn: int) -> str:
    return (
        f"the chat template is not prefix-stable at message {turn}: rendering a conversation "
        "up to a turn is not the start of rendering it further, so assistant tokens cannot be "
        "located (templates that rewrite earlier turns, e.g. strip reasoning, do this); "
        "use a template that only appends"
    )
