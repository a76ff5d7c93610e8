"""Training data files become rows: JSONL through our own reader, other formats through `datasets`.

Every row is validated before any model loads, and a bad one stops the run with a DataError naming
the file, the line (JSONL) or row (other formats, from 1) and the field. `datasets` runs offline:
it only ever reads the local file it is given.
"""

from __future__ import annotations

import datetime
import json
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from learner.prompts import Row, SupervisedRow, UnsupervisedRow
from shared.config import LearnerConfig
from shared.errors import ConfigError, DataError

FORMATS = (".jsonl", ".json", ".parquet", ".arrow")
"""File suffixes `--data` reads; a directory is read as a `datasets` save_to_disk directory."""


@dataclass(frozen=True)
class Data:
    """The rows trained on and the held-out rows (none without eval_data or eval_fraction)."""

    train: list[Row]
    eval: list[Row]


def load_data(cfg: LearnerConfig) -> Data:
    """`cfg.data`'s rows, less the held-out share with `eval_fraction`; the held-out rows come from
    `eval_data` or that share. Raises a DataError (or ConfigError) before any model loads."""
    rows = load_rows(cfg.data, cfg.mode, prompt_key=cfg.prompt_key, answer_key=cfg.answer_key)
    if cfg.eval_data is not None:
        return Data(rows, load_rows(cfg.eval_data, cfg.mode, prompt_key=cfg.prompt_key, answer_key=cfg.answer_key))
    if cfg.eval_fraction is None:
        return Data(rows, [])
    held = round(len(rows) * cfg.eval_fraction)
    if not 0 < held < len(rows):
        raise ConfigError(
            f"eval_fraction {cfg.eval_fraction} of the {len(rows)} rows of {cfg.data} holds out {held}: "
            "at least one row must be held out and one left to train on"
        )
    # Its own RNG, seeded like the run: the same split on every run and resume of it.
    held_out = set(random.Random(cfg.seed).sample(range(len(rows)), held))
    return Data(
        train=[row for i, row in enumerate(rows) if i not in held_out],
        eval=[row for i, row in enumerate(rows) if i in held_out],
    )


def load_rows(
    path: Path,
    mode: Literal["unsupervised", "supervised"],
    *,
    prompt_key: str | None = None,
    answer_key: str | None = None,
) -> list[Row]:
    """Every row of a data file, or a DataError naming the file, line or row, and field of the first
    bad one. Columns other than the prompt (or text) and answer go to the row's `extra`."""
    if path.suffix == ".jsonl":
        records, unit = _jsonl_records(path), "line"
    elif path.is_dir() or path.suffix in FORMATS:
        records, unit = enumerate(_dataset_records(path), start=1), "row"
    else:
        raise DataError(str(path), 0, "-", f"unknown format: expected {', '.join(FORMATS)} or a save_to_disk directory")
    rows = [
        _row(record, mode, prompt_key, answer_key, error=partial(DataError, str(path), position, unit=unit))
        for position, record in records
    ]
    if not rows:
        raise DataError(str(path), 0, "-", "the file holds no rows")
    return rows


def _row(
    record: dict[str, Any],
    mode: Literal["unsupervised", "supervised"],
    prompt_key: str | None,
    answer_key: str | None,
    error: Callable[[str, str], DataError],
) -> Row:
    """One record as a row: its prompt (or text) and answer columns renamed to the row's fields, the
    others kept in `extra`; a bad one raises `error(column, reason)`.

    A null counts as a missing column: columnar files (and JSONL written from them) have every
    column in every row, and write "not in this row" as null. In `extra` nulls stay, so every row
    has the same columns.
    """
    present = {k: v for k, v in record.items() if v is not None}
    if mode == "supervised":
        row_type: type[Row] = SupervisedRow
        columns = {"prompt": prompt_key or "prompt", "answer": answer_key or "answer"}
        reads = f"{list(columns.values())}"
    elif prompt_key is not None:
        row_type, columns, reads = UnsupervisedRow, {"prompt": prompt_key}, f"{[prompt_key]}"
    else:
        row_type, reads = UnsupervisedRow, "['text'] or ['prompt']"
        if "text" in present and "prompt" in present:
            raise error("prompt", "a row has 'text' or 'prompt', not both (--prompt-key picks one)")
        if "text" not in present and "prompt" not in present:
            raise error("text", f"Field required ({mode} mode reads {reads})")
        columns = {"prompt": "prompt"} if "prompt" in present else {"text": "text"}
    fields = {name: _messages_without_nulls(present[column]) for name, column in columns.items() if column in present}
    extra = {k: _json_value(v) for k, v in record.items() if k not in columns.values()}
    try:
        return row_type.model_validate({**fields, "extra": extra})
    except ValidationError as e:
        problem = e.errors()[0]
        name, *rest = problem["loc"]
        # A field's error names its column (a text row's prompt is its text); an extra column's, that column.
        fields_columns = columns | ({"prompt": "text"} if "text" in columns else {})
        column = ".".join(map(str, [fields_columns[name], *rest] if name in fields_columns else rest))
        hint = f" ({mode} mode reads {reads})" if problem["type"] == "missing" and not rest else ""
        raise error(column, problem["msg"] + hint) from e


def _messages_without_nulls(value: Any) -> Any:
    """A list of chat messages without their null keys: Arrow gives every message of a column the
    keys any of them has (a 'name' in one message is null in all others)."""
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return [{k: v for k, v in m.items() if v is not None} for m in value]
    return value


def _json_value(value: Any) -> Any:
    """A column's value as JSON can hold it: dates and times (Parquet timestamps come as datetime)
    as ISO 8601 texts, inside lists and mappings too; anything else as it is."""
    if isinstance(value, datetime.date | datetime.time):  # datetime.datetime is a date
        return value.isoformat()
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; a line that is not a JSON object is a DataError."""
    if not path.is_file():
        raise DataError(str(path), 0, "-", "no such file")
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(str(path), line_no, "-", f"not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(obj, dict):
                raise DataError(str(path), line_no, "-", f"expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def _dataset_records(path: Path) -> list[dict[str, Any]]:
    """The rows of a .json, .parquet or .arrow file or a save_to_disk directory, read by `datasets`."""
    if not path.exists():
        raise DataError(str(path), 0, "-", "no such file")
    datasets = _offline_datasets()
    from datasets.exceptions import DatasetsError

    # The builders behind from_json/from_parquet write an Arrow copy into a cache: a throw-away one
    # here, with the rows kept in memory, so nothing outlives the read.
    with tempfile.TemporaryDirectory(prefix="grpo-data-") as cache_dir:
        try:
            if path.is_dir():
                dataset = datasets.load_from_disk(str(path), keep_in_memory=True)
            elif path.suffix == ".json":
                dataset = datasets.Dataset.from_json(str(path), cache_dir=cache_dir, keep_in_memory=True)
            elif path.suffix == ".parquet":
                dataset = datasets.Dataset.from_parquet(str(path), cache_dir=cache_dir, keep_in_memory=True)
            else:
                dataset = datasets.Dataset.from_file(str(path), in_memory=True)
        except (OSError, ValueError, DatasetsError) as e:
            # DatasetGenerationError says only "An error occurred"; what went wrong is its cause.
            reason = "; ".join(f"{type(x).__name__}: {x}" for x in (e, e.__cause__) if x is not None)
            raise DataError(str(path), 0, "-", f"datasets cannot read it ({reason})") from e
        if isinstance(dataset, datasets.DatasetDict):
            split = path / next(iter(dataset))
            raise DataError(
                str(path), 0, "-", f"holds the splits {list(dataset)}: give one split's directory ({split})"
            )
        return dataset.to_list()


def _offline_datasets():
    """The `datasets` module, set never to reach the Hugging Face Hub. Its own switch, not the
    HF_HUB_OFFLINE environment variable, which the local rollout server and the model loading
    would inherit."""
    import datasets

    datasets.config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()  # a bar per file read of a few rows
    return datasets
