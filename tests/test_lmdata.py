"""Causal-LM data: chatterbot, chat tables, text files, loss masks, packing, prompts, errors."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

from declora.data import causal_lm as lmdata
from declora.data.causal_lm import (
    IGNORE_INDEX,
    LMData,
    generation_prompts,
    load_lm_data,
    pack_text,
    tokenize_chat,
)
from declora.errors import DataError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

needs_chatterbot = pytest.mark.skipif(
    importlib.util.find_spec("chatterbot_corpus") is None,
    reason="the chatterbot-corpus wheel is not installed",
)


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def chatml(tokenizer):
    """The MiniLM WordPiece tokenizer with a ChatML template (lower-cases like MiniLM)."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def plain(tokenizer):
    """No chat template; [SEP] stands in for the eos a causal-LM tokenizer would have."""
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = "[SEP]"
    return tok


def _trained(tok, example: dict) -> str:
    ids = [i for i, lab in zip(example["input_ids"], example["labels"], strict=True) if lab != -100]
    return tok.decode(ids)


def _check_labels(example: dict) -> None:
    assert len(example["input_ids"]) == len(example["labels"])
    for i, lab in zip(example["input_ids"], example["labels"], strict=True):
        assert lab in (IGNORE_INDEX, i)


# --------------------------------------------------------------------------- chatterbot


@pytest.fixture(scope="module")
def chatterbot() -> LMData:
    return load_lm_data("chatterbot")


@needs_chatterbot
def test_chatterbot_sizes_groups_and_dedupe(chatterbot):
    s = chatterbot.summary()
    assert s["kind"] == "chat" and s["source"] == "chatterbot"
    # 2,026 entries; trivia.yml has one bare string (a one-turn entry, dropped) and
    # tech_support.yml repeats 10 conversations 105 times each, hence 898 after dedupe.
    assert s["train_size"] + s["test_size"] == 898
    assert s["test_size"] == 90
    assert len(chatterbot.group_names) == 21
    assert {"AI", "trivia", "tech support", "health"} <= set(chatterbot.group_names)
    assert sum(s["groups"].values()) == s["train_size"]
    raw = load_lm_data("chatterbot", dedupe=False)
    assert len(raw.train) + len(raw.test) == 2025
    keys = {json.dumps(c) for c in chatterbot.train + chatterbot.test}
    assert len(keys) == 898


@needs_chatterbot
def test_chatterbot_conversations_alternate_and_end_with_assistant(chatterbot):
    lengths = set()
    for conv in chatterbot.train + chatterbot.test:
        roles = [m["role"] for m in conv]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in conv)
        lengths.add(len(conv))
    assert max(lengths) > 2  # multi-turn conversations survive


@needs_chatterbot
def test_chatterbot_split_depends_only_on_split_seed(chatterbot):
    again = load_lm_data("chatterbot", max_train_examples=50)
    assert again.test == chatterbot.test
    assert len(again.train) == 50 and set(map(json.dumps, again.train)) <= set(
        map(json.dumps, chatterbot.train)
    )
    assert len(again.train_labels) == 50
    other = load_lm_data("chatterbot", split_seed=1)
    assert other.test != chatterbot.test
    train_keys = {json.dumps(c) for c in chatterbot.train}
    assert not train_keys & {json.dumps(c) for c in chatterbot.test}
    codes = {
        json.dumps(c): g for c, g in zip(chatterbot.train, chatterbot.train_labels, strict=True)
    }
    assert chatterbot.group_names[codes[json.dumps(chatterbot.train[0])]] == "AI"


def test_chatterbot_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(lmdata.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps chatterbot-corpus==1\.3\.3"):
        load_lm_data("chatterbot")


def test_chatterbot_entries_are_cleaned():
    conv = lmdata._chatterbot_conversation
    assert conv("a question - 'merged answer'") is None
    assert conv(["only a question"]) is None
    assert conv([" q ", 1984, "and?"]) == [_user("q"), _bot("1984")]
    assert conv(["q", True]) is None
    assert conv(["q", ["nested"]]) is None


# --------------------------------------------------------------------------- loss masks


def test_template_masks_everything_but_the_answer(chatml):
    conv = [_user("where is the cat"), _bot("the cat is here")]
    (ex,), stats = tokenize_chat(chatml, [conv], max_length=64)
    _check_labels(ex)
    assert _trained(chatml, ex) == "the cat is here <|im_end|>"
    assert stats == {"truncated": 0, "dropped": 0}
    full = chatml.apply_chat_template(conv, tokenize=False)
    assert ex["input_ids"] == chatml(full, add_special_tokens=False)["input_ids"]
    masked = [i for i, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab == -100]
    assert "where" in chatml.decode(masked) and "where" not in _trained(chatml, ex)


def test_template_multi_turn_trains_both_answers(chatml):
    conv = [
        {"role": "system", "content": "be kind"},
        _user("hello"),
        _bot("hi there"),
        _user("how are you"),
        _bot("very good"),
    ]
    (ex,), _ = tokenize_chat(chatml, [conv], max_length=128)
    _check_labels(ex)
    assert _trained(chatml, ex) == "hi there <|im_end|> very good <|im_end|>"
    trained = np.array(ex["labels"]) != -100
    edges = np.flatnonzero(np.diff(np.r_[0, trained.astype(int), 0]))
    spans = [chatml.decode(ex["input_ids"][a:b]) for a, b in edges.reshape(-1, 2)]
    assert spans == ["hi there <|im_end|>", "very good <|im_end|>"]  # two separate spans


def test_plain_format_without_template(plain):
    conv = [_user("good day"), _bot("good night"), _user("again"), _bot("bye")]
    (ex,), _ = tokenize_chat(plain, [conv], max_length=64)
    _check_labels(ex)
    assert _trained(plain, ex) == "good night [SEP] bye [SEP]"
    assert plain.decode(ex["input_ids"]) == (
        "user : good day assistant : good night [SEP] user : again assistant : bye [SEP]"
    )


def test_plain_format_needs_an_eos(tokenizer):
    with pytest.raises(DataError, match="eos token"):
        tokenize_chat(tokenizer, [[_user("a"), _bot("b")]], max_length=16)


def test_truncation_counts_and_drops(chatml):
    short = [_user("hi"), _bot("yes")]
    long_answer = [_user("hi"), _bot("one two three four five six seven eight")]
    long_question = [_user(" ".join(["word"] * 40)), _bot("no")]
    examples, stats = tokenize_chat(chatml, [short, long_answer, long_question], max_length=12)
    assert stats == {"truncated": 2, "dropped": 1}
    assert len(examples) == 2
    assert all(len(ex["input_ids"]) <= 12 for ex in examples)
    assert len(examples[1]["input_ids"]) == 12
    assert _trained(chatml, examples[1]).startswith("one two")


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %} end{% endif %}\n{% endfor %}"
    )
    with pytest.raises(DataError, match="prefix-stable"):
        tokenize_chat(tok, [[_user("a"), _bot("b")]], max_length=16)


def test_conversation_without_answer_is_refused(chatml):
    with pytest.raises(DataError, match="no assistant turn"):
        tokenize_chat(chatml, [[_user("a")]], max_length=16)


# --------------------------------------------------------------------------- packing


def test_pack_text_blocks(plain):
    docs = ["the cat sat on the mat", "a dog ran far away", "birds sing"]
    blocks = pack_text(plain, docs, block_size=5)
    n_tokens = sum(len(plain(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    assert len(blocks) == n_tokens // 5
    assert all(len(b["input_ids"]) == 5 and b["labels"] == b["input_ids"] for b in blocks)
    stream = [t for b in blocks for t in b["input_ids"]]
    assert stream[6] == plain.eos_token_id  # the first document has 6 tokens
    assert plain.decode(stream[:6]) == docs[0]


def test_pack_text_too_short(plain):
    with pytest.raises(DataError, match="fewer than one block"):
        pack_text(plain, ["tiny"], block_size=64)


# --------------------------------------------------------------------------- generation


def test_generation_prompts_with_template(chatml):
    convs = [
        [_user("hello"), _bot("hi there"), _user("how are you"), _bot("very good")],
        [_user(" ".join(["word"] * 40)), _bot("no")],
    ]
    (ids, ref), (long_ids, long_ref) = generation_prompts(chatml, convs, max_length=16)
    assert ref == "very good" and long_ref == "no"
    text = chatml.decode(ids)
    assert text.endswith("how are you <|im_end|> <|im_start|> assistant")
    assert "hi there" in text  # earlier answers are context
    assert len(long_ids) == 16 and chatml.decode(long_ids).endswith("<|im_start|> assistant")
    ((full_ids, _),) = generation_prompts(chatml, convs[:1], max_length=64)
    assert full_ids[-16:] == ids  # cut from the left
    (ex,), _ = tokenize_chat(chatml, convs[:1], max_length=64)
    assert ex["input_ids"][: len(full_ids)] == full_ids  # the same tokens as in training
    assert ex["labels"][len(full_ids) - 1] == -100 and ex["labels"][len(full_ids)] != -100


def test_generation_prompts_plain(plain):
    conv = [_user("good day"), _bot("good night"), _user("again")]
    ((ids, ref),) = generation_prompts(plain, [conv], max_length=32)
    assert ref == "good night"
    assert plain.decode(ids) == "user : good day assistant :"


# --------------------------------------------------------------------------- files


def _pairs(n: int = 20) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "question": [f"question {i}" for i in range(n)],
            "answer": [f"answer {i}" for i in range(n)],
            "topic": [f"t{i % 2}" for i in range(n)],
        }
    )


def _messages(i: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "short answers"},
        _user(f"q{i}"),
        _bot(f"a{i}"),
        _user("thanks"),
    ]


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_file_prompt_response(tmp_path, ext):
    frame = _pairs()
    frame.loc[3, "answer"] = ""  # empty rows are dropped
    path = tmp_path / f"chat.{ext}"
    if ext == "csv":
        frame.to_csv(path, index=False)
    elif ext == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    data = load_lm_data(
        "file",
        path=str(path),
        prompt_column="question",
        response_column="answer",
        group_column="topic",
        test_size=0.25,
    )
    assert data.kind == "chat" and data.source == str(path)
    assert len(data.train) + len(data.test) == 19
    assert data.group_names == ["t0", "t1"]
    for conv, code in zip(data.train, data.train_labels, strict=True):
        i = int(conv[0]["content"].split()[1])
        assert conv == [_user(f"question {i}"), _bot(f"answer {i}")]
        assert data.group_names[code] == f"t{i % 2}"
    assert data.summary()["groups"] == {
        "t0": int((data.train_labels == 0).sum()),
        "t1": int((data.train_labels == 1).sum()),
    }


def test_file_messages_jsonl_and_json_string_csv(tmp_path):
    rows = [{"messages": _messages(i)} for i in range(10)] + [{"messages": []}]
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    csv = tmp_path / "chat.csv"
    pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in rows]}).to_csv(csv, index=False)
    a = load_lm_data("file", path=str(jsonl), split_seed=3)
    b = load_lm_data("file", path=str(csv), split_seed=3)
    assert a.train == b.train and a.test == b.test
    assert len(a.train) + len(a.test) == 10  # the empty row is dropped
    assert a.group_names == ["all"] and not a.train_labels.any()
    # the trailing unanswered user turn is dropped
    assert a.test[0][-1]["role"] == "assistant" and len(a.test[0]) == 3


def test_file_test_path_is_the_test_set(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    _pairs(12).rename(columns={"question": "prompt", "answer": "response"}).to_json(
        train, orient="records", lines=True
    )
    pd.DataFrame({"prompt": ["p"], "response": ["r"]}).to_json(test, orient="records", lines=True)
    data = load_lm_data("file", path=str(train), test_path=str(test), max_train_examples=5)
    assert data.test == [[_user("p"), _bot("r")]]
    assert len(data.train) == 5


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_lm_data("file", path=str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match=r"needs data\.path"):
        load_lm_data("file")
    path = tmp_path / "t.csv"
    _pairs().to_csv(path, index=False)
    with pytest.raises(DataError, match="columns are: question, answer, topic"):
        load_lm_data("file", path=str(path))
    with pytest.raises(DataError, match=r"response_column 'response' not in .*question, answer"):
        load_lm_data("file", path=str(path), prompt_column="question")
    with pytest.raises(DataError, match="group_column 'shop'"):
        load_lm_data(
            "file", path=str(path), prompt_column="question", response_column="answer",
            group_column="shop",
        )  # fmt: skip


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "bot", "content": "x"}], "role 'bot'; accepted roles: system, user, assistant"),
        ([_user("x"), {"role": "assistant", "content": 3}], "content must be a string"),
        ([_user("x")], "no assistant turn"),
        ([{"text": "x"}], "'role' and 'content'"),
        ("[not json", "not valid JSON"),
    ],
)
def test_malformed_messages(tmp_path, messages, message):
    path = tmp_path / "m.csv"
    cell = messages if isinstance(messages, str) else json.dumps(messages)
    pd.DataFrame({"messages": [json.dumps([_user("a"), _bot("b")]), cell]}).to_csv(path)
    with pytest.raises(DataError, match=r"row 2 of .*m\.csv") as err:
        load_lm_data("file", path=str(path))
    assert message in str(err.value)


def test_unknown_name_and_bad_options():
    with pytest.raises(DataError, match="accepted: chatterbot, file, text"):
        load_lm_data("alpaca")
    with pytest.raises(DataError, match="test_size"):
        load_lm_data("chatterbot", test_size=1.0)
    with pytest.raises(DataError, match="does not apply to chatterbot"):
        load_lm_data("chatterbot", group_column="x")


# --------------------------------------------------------------------------- text


def test_text_single_file_splits_on_blank_lines(tmp_path):
    path = tmp_path / "book.txt"
    docs = [f"paragraph {i}\nstill paragraph {i}" for i in range(10)]
    path.write_text("\n\n  \n".join(docs) + "\n\n\n")
    data = load_lm_data("text", path=str(path), test_size=0.2)
    assert data.kind == "text"
    assert sorted(data.train + data.test) == sorted(docs)
    assert len(data.test) == 2


def test_text_folder_one_document_per_file(tmp_path):
    for i in range(5):
        (tmp_path / f"doc{i}.txt").write_text(f"first line {i}\n\nsecond part {i}\n")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "notes.md").write_text("ignored")
    data = load_lm_data("text", path=str(tmp_path), test_size=0.2)
    assert sorted(data.train + data.test) == [
        f"first line {i}\n\nsecond part {i}" for i in range(5)
    ]
    with pytest.raises(DataError, match=r"no \.txt files; it holds: a\.md"):
        sub = tmp_path / "sub"
        sub.mkdir()
        (sub / "a.md").write_text("x")
        load_lm_data("text", path=str(sub))


def test_text_table_column(tmp_path):
    path = tmp_path / "docs.jsonl"
    pd.DataFrame({"body": [f"doc {i}" for i in range(8)] + [""]}).to_json(
        path, orient="records", lines=True
    )
    data = load_lm_data("text", path=str(path), text_column="body", test_size=0.25)
    assert len(data.train) + len(data.test) == 8
    with pytest.raises(DataError, match="text_column 'text' not in"):
        load_lm_data("text", path=str(path))
