"""Data files in every format `--data` takes become the same rows; columns can be renamed, other
columns are kept, bad rows name file, row and field, and held-out rows never reach training."""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from learner.cli import main, parse_config
from learner.data import Data, load_data, load_rows
from learner.prompts import PromptEncoder, SupervisedRow, UnsupervisedRow
from learner.tiny_model import write_tokenizer
from shared.config import LearnerConfig
from shared.errors import ConfigError, DataError

RECORDS = [
    {"prompt": "1+1=", "answer": "2", "id": 0, "tags": ["easy"]},
    {"prompt": "12+7=", "answer": "19", "id": 1, "tags": []},
    {"prompt": "30+4=", "answer": "34", "id": 2, "tags": ["carry", "long"]},
]
ROWS = [
    SupervisedRow(prompt=r["prompt"], answer=r["answer"], extra={"id": r["id"], "tags": r["tags"]}) for r in RECORDS
]


def write(records: list[dict], path: Path) -> Path:
    """`records` as a data file of the format `path`'s suffix names; no suffix: a save_to_disk directory."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))  # one JSON array, not JSON lines
    elif path.suffix == ".parquet":
        columnar(records).to_parquet(str(path))
    elif path.suffix == ".arrow":
        # The Arrow file datasets itself writes (a save_to_disk shard), on its own.
        columnar(records).save_to_disk(str(path.with_suffix(".dir")))
        (shard,) = path.with_suffix(".dir").glob("*.arrow")
        shard.rename(path)
    else:
        columnar(records).save_to_disk(str(path))
    return path


def columnar(records: list[dict]) -> Dataset:
    """Every column of any record, null in the records without it (Dataset.from_list takes the first
    record's columns only)."""
    names = list(dict.fromkeys(name for record in records for name in record))
    return Dataset.from_dict({name: [record.get(name) for record in records] for name in names})


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.parquet", "data.arrow", "saved"])
def test_every_format_gives_the_same_rows_with_their_other_columns(tmp_path: Path, name: str) -> None:
    assert load_rows(write(RECORDS, tmp_path / name), "supervised") == ROWS


def test_chat_prompts_in_parquet_are_the_chat_templates_token_ids(tmp_path: Path) -> None:
    write_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    conversation = [{"role": "system", "content": "Add."}, {"role": "user", "content": "12+7="}]
    # One Arrow column holds prompts of one kind: all texts, or (here) all conversations.
    records = [{"prompt": conversation, "answer": "19"}, {"prompt": conversation[1:], "answer": "19"}]
    chat, short = load_rows(write(records, tmp_path / "chat.parquet"), "supervised")
    assert [m.model_dump() for m in chat.prompt] == conversation and short.prompt_text == "12+7="

    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    # The bundled template, written out: a test of what the template gave, not of the same call twice.
    assert rendered == "<|im_start|>system\nAdd.<|im_end|>\n<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\n"
    encoder = PromptEncoder(tokenizer, LearnerConfig(mode="supervised", max_prompt_tokens=512))
    assert encoder.prompt(chat) == tokenizer.encode(rendered, add_special_tokens=False)
    assert encoder.prompt(short) == encoder.prompt(chat)[-len(encoder.prompt(short)) :] != encoder.prompt(chat)
    # Unsupervised mode takes the same conversation as TRL's prompt-only row; "answer" is then a column.
    (row,) = load_rows(write(records[:1], tmp_path / "u.parquet"), "unsupervised")
    assert (row.text, row.extra) == (None, {"answer": "19"})
    assert encoder.prompt(row) == encoder.prompt(chat)


def test_prompt_and_answer_keys_rename_the_columns(tmp_path: Path) -> None:
    records = [{"question": "1+1=", "solution": "2", "prompt": "not this one"}]
    path = write(records, tmp_path / "renamed.parquet")
    cfg = parse_config(
        ["--mode", "supervised", "--data", str(path), "--prompt-key", "question", "--answer-key", "solution"]
    )
    (row,) = load_data(cfg).train
    assert row == SupervisedRow(prompt="1+1=", answer="2", extra={"prompt": "not this one"})
    # In unsupervised mode --prompt-key names the prompt column; without it a row's "text" is read.
    (row,) = load_rows(path, "unsupervised", prompt_key="question")
    assert (row.prompt, row.text, row.extra) == ("1+1=", None, {"solution": "2", "prompt": "not this one"})
    (row,) = load_rows(write([{"text": "The cat", "n": 1}], tmp_path / "t.parquet"), "unsupervised")
    assert row == UnsupervisedRow(text="The cat", extra={"n": 1}) and row.prompt == "The cat"
    with pytest.raises(
        DataError, match=r"row 1: field 'answer': Field required \(supervised mode reads \['question', 'answer'\]\)"
    ):
        load_rows(path, "supervised", prompt_key="question")  # no "answer" column


def test_chat_messages_with_a_column_only_some_have_and_timestamps_load(tmp_path: Path) -> None:
    # Exported chats carry null keys (OpenAI's "tool_calls": null), and Arrow gives every message of
    # a column the keys any message has; a Parquet timestamp column reads back as datetime.
    when = datetime.datetime(2026, 12, 2, 5, 30)
    records = [
        {
            "prompt": [{"role": "system", "content": "Add.", "tool_calls": None}, {"role": "user", "content": "1+1="}],
            "at": when,
        },
        {"prompt": [{"role": "user", "content": "2+2="}], "at": when},
    ]
    first, second = load_rows(write(records, tmp_path / "chat.parquet"), "unsupervised")
    assert [m.content for m in first.prompt] == ["Add.", "1+1="] and second.prompt[0].content == "2+2="
    assert first.extra == {"at": "2026-12-02T05:30:00"}


def test_other_columns_keep_their_json_values_and_nulls(tmp_path: Path) -> None:
    # A columnar file has every column in every row: a column of some rows is null in the others.
    records = [
        {"text": "The cat", "meta": {"source": "a", "score": 0.5}, "ids": [1, 2], "note": None},
        {"prompt": [{"role": "user", "content": "Hi"}], "meta": {"source": "b", "score": None}, "ids": [], "note": "x"},
    ]
    doc, chat = load_rows(write(records, tmp_path / "mixed.parquet"), "unsupervised")
    assert doc.text == "The cat" and chat.text is None and chat.prompt_text == "Hi"
    # The unused text/prompt column stays in extra, null, so every row has the same columns.
    assert doc.extra == {"prompt": None, "meta": {"source": "a", "score": 0.5}, "ids": [1, 2], "note": None}
    assert chat.extra == {"text": None, "meta": {"source": "b", "score": None}, "ids": [], "note": "x"}
    json.dumps([doc.extra, chat.extra])  # what reward functions and logs get is JSON-able


@pytest.mark.parametrize(
    ("mode", "records", "row", "field", "needle"),
    [
        # row 2's answer is null: the column exists, the value does not
        (
            "supervised",
            [{"prompt": "a", "answer": "b"}, {"prompt": "c", "answer": None}],
            2,
            "answer",
            "Field required",
        ),
        ("supervised", [{"prompt": "a", "answer": "b"}, {"prompt": "", "answer": "d"}], 2, "prompt", "at least 1"),
        ("supervised", [{"prompt": "a", "answer": 3}], 1, "answer", "valid string"),  # an int column
        ("unsupervised", [{"text": "a"}, {"text": "b"}, {"title": "c"}], 3, "text", "reads ['text'] or ['prompt']"),
        ("unsupervised", [{"text": "a", "prompt": "b"}], 1, "prompt", "not both"),
        ("unsupervised", [{"prompt": [{"role": "", "content": "x"}]}], 1, "prompt.messages.0.role", "at least 1"),
        ("unsupervised", [{"text": "a", "blob": b"\x00\x01"}], 1, "blob", "JSON"),  # bytes (dates become ISO texts)
    ],
)
def test_bad_parquet_rows_name_file_row_and_field(tmp_path: Path, mode, records, row, field, needle) -> None:
    path = write(records, tmp_path / "bad.parquet")
    with pytest.raises(DataError) as e:
        load_rows(path, mode)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), row, field)
    assert str(e.value).startswith(f"{path}: row {row}: field {field!r}: ") and needle in str(e.value)


def test_unreadable_files_are_data_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    splits = tmp_path / "splits"
    DatasetDict({"train": Dataset.from_list(RECORDS)}).save_to_disk(str(splits))
    empty = tmp_path / "empty.parquet"
    Dataset.from_dict({"prompt": [], "answer": []}).to_parquet(str(empty))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"prompt": "a", "answer": "b"}')
    for path, needle in [
        (broken, "datasets cannot read it (ArrowInvalid: Parquet magic bytes not found"),
        (bad_json, "datasets cannot read it (DatasetGenerationError: An error occurred while generating the dataset; "),
        (splits, f"holds the splits ['train']: give one split's directory ({splits / 'train'})"),
        (empty, "datasets cannot read it (ValueError: "),  # datasets: 'Instruction "train" corresponds to no data!'
        (tmp_path / "absent.parquet", "no such file"),
        (tmp_path / "data.csv", "unknown format"),
    ]:
        with pytest.raises(DataError, match=r"field '-': .*" + re.escape(needle)) as e:
            load_rows(path, "supervised")
        assert e.value.path == str(path)
    assert load_rows(splits / "train", "supervised") == ROWS


def test_datasets_is_kept_offline_without_touching_the_environment(tmp_path: Path, monkeypatch) -> None:
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    load_rows(write(RECORDS, tmp_path / "d.parquet"), "supervised")
    assert datasets.config.HF_HUB_OFFLINE is True
    # The local rollout server and model loading inherit the environment: it stays as it was.
    assert "HF_HUB_OFFLINE" not in os.environ


def test_eval_fraction_holds_out_a_seeded_share_that_is_never_trained_on(tmp_path: Path) -> None:
    records = [{"text": f"row {i}"} for i in range(20)]
    path = write(records, tmp_path / "d.jsonl")
    data = load_data(LearnerConfig(data=path, eval_fraction=0.25, seed=3))
    train, held = [r.text for r in data.train], [r.text for r in data.eval]
    assert len(held) == 5 and len(train) == 15 and sorted(train + held) == sorted(r["text"] for r in records)
    assert train == [r["text"] for r in records if r["text"] not in held]  # training keeps the file's order
    assert load_data(LearnerConfig(data=path, eval_fraction=0.25, seed=3)) == data  # same seed, same split
    other = load_data(LearnerConfig(data=path, eval_fraction=0.25, seed=4))
    assert [r.text for r in other.eval] != held  # C(20, 5) = 15504 splits: a seed that changes nothing is a bug
    assert load_data(LearnerConfig(data=path)).eval == []


@pytest.mark.parametrize(("count", "fraction"), [(1, 0.5), (3, 0.1), (3, 0.9)])
def test_eval_fraction_that_leaves_a_side_empty_is_a_config_error(tmp_path: Path, count, fraction) -> None:
    # round(1 * 0.5) = 0, round(3 * 0.1) = 0 held out; round(3 * 0.9) = 3 held out, none to train on
    path = write([{"text": f"row {i}"} for i in range(count)], tmp_path / "d.jsonl")
    with pytest.raises(
        ConfigError, match=re.escape(f"eval_fraction {fraction} of the {count} rows of {path} holds out")
    ):
        load_data(LearnerConfig(data=path, eval_fraction=fraction))


def test_eval_data_is_read_like_the_training_data(tmp_path: Path) -> None:
    train = write([{"q": "1+1=", "a": "2"}], tmp_path / "train.jsonl")
    held = write([{"q": "5+5=", "a": "10", "id": 9}], tmp_path / "held.parquet")
    data = load_data(LearnerConfig(mode="supervised", data=train, eval_data=held, prompt_key="q", answer_key="a"))
    assert data == Data(
        train=[SupervisedRow(prompt="1+1=", answer="2")],
        eval=[SupervisedRow(prompt="5+5=", answer="10", extra={"id": 9})],
    )
    with pytest.raises(DataError, match="held.parquet: row 1: field 'prompt'"):
        load_data(LearnerConfig(mode="supervised", data=write(RECORDS, tmp_path / "t.jsonl"), eval_data=held))


def test_data_flags_and_their_conflicts() -> None:
    cfg = parse_config(["--eval-data", "e.parquet", "--prompt-key", "q"])
    assert (cfg.eval_data, cfg.prompt_key, cfg.eval_fraction) == (Path("e.parquet"), "q", None)
    for flags, needle in [
        (["--eval-data", "e.parquet", "--eval-fraction", "0.1"], "give one"),
        (["--eval-fraction", "1"], "eval_fraction: Input should be less than 1"),
        (["--eval-fraction", "0"], "eval_fraction: Input should be greater than 0"),
        (["--answer-key", "a"], "answer column of supervised mode"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            parse_config(flags)


def test_bad_parquet_exits_2_naming_the_row_before_loading_a_model(tmp_path: Path, capsys) -> None:
    data = write([{"prompt": "a", "answer": "b"}, {"prompt": "c", "answer": None}], tmp_path / "d.parquet")
    flags = ["--mode", "supervised", "--data", str(data), "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        main([*flags, "--model", str(tmp_path / "none")])  # reaching the model would fail differently
    assert e.value.code == 2
    assert f"{data}: row 2: field 'answer': Field required" in capsys.readouterr().err
