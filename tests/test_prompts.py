"""JSONL data files are validated row by row, and errors name the file, line and field; rows become
batches and token ids. (Other formats, columns and held-out rows: test_data.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from learner.data import load_rows
from learner.prompts import PromptEncoder, PromptSampler, SupervisedRow, UnsupervisedRow
from shared.config import LearnerConfig
from shared.errors import DataError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("mode", "text", "line", "field", "needle"),
    [
        ("supervised", '{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n', 2, "answer", "Field required"),
        ("supervised", '{"prompt": "a", "answer": ""}\n', 1, "answer", "at least 1 character"),
        ("unsupervised", '{"text": "ok"}\n\n{"text": 3}\n', 3, "text", "valid string"),  # blank lines count
        ("unsupervised", '{"text": "ok"}\n{"text": "x"\n', 2, "-", "not valid JSON"),
        ("unsupervised", '["text"]\n', 1, "-", "JSON object"),
        ("unsupervised", '{"question": "a"}\n', 1, "text", "unsupervised mode reads ['text'] or ['prompt']"),
        ("unsupervised", '{"text": "a", "prompt": "b"}\n', 1, "prompt", "not both"),
        ("unsupervised", '{"prompt": [{"role": "user"}]}\n', 1, "prompt.messages.0.content", "required"),
        ("supervised", "\n\n", 0, "-", "no rows"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path: Path, mode, text, line, field, needle) -> None:
    path = write(tmp_path, text)
    with pytest.raises(DataError) as e:
        load_rows(path, mode)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), line, field)
    assert needle in str(e.value) and str(e.value).startswith(f"{path}:{line}:")


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_rows(tmp_path / "nope.jsonl", "unsupervised")


def test_rows_load_and_other_columns_are_kept_as_extra(tmp_path: Path) -> None:
    path = write(tmp_path, '{"prompt": "1+1=", "answer": "2", "id": 7}\n')
    assert load_rows(path, "supervised") == [SupervisedRow(prompt="1+1=", answer="2", extra={"id": 7})]
    # Unsupervised mode takes TRL's prompt-only rows too; there the answer is just another column.
    (row,) = load_rows(path, "unsupervised")
    assert (row.text, row.prompt, row.extra) == (None, "1+1=", {"answer": "2", "id": 7})


def test_sampler_visits_every_row_once_per_epoch_and_is_seeded() -> None:
    rows = [UnsupervisedRow(text=str(i)) for i in range(5)]
    sampler = PromptSampler(rows, batch_size=5, seed=3)
    first, second = sampler.next_batch(), sampler.next_batch()
    assert sorted(r.text for r in first) == sorted(r.text for r in second) == [str(i) for i in range(5)]
    assert first == PromptSampler(rows, batch_size=5, seed=3).next_batch()


class CharTokenizer:
    eos_token_id, pad_token_id, bos_token_id = 0, None, None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


def test_a_sampler_resumed_over_another_number_of_rows_starts_a_new_epoch() -> None:
    # A resume let through with other data (--allow-config-change): the saved epoch's order holds
    # indices of the old rows, 4 of 6 left, at least one of them past the 3 rows now there.
    rows = [UnsupervisedRow(text=str(i)) for i in range(6)]
    sampler = PromptSampler(rows, batch_size=2, seed=3)
    sampler.next_batch()
    for now in (rows[:3], [*rows, UnsupervisedRow(text="6")]):
        resumed = PromptSampler(now, batch_size=len(now), seed=0)
        resumed.load_state_dict(sampler.state_dict())
        assert sorted(r.text for r in resumed.next_batch()) == sorted(r.text for r in now)  # one whole epoch
    same = PromptSampler(rows, batch_size=4, seed=0)
    same.load_state_dict(sampler.state_dict())
    assert same.next_batch() == [rows[i] for i in reversed(sampler.state_dict()["order"])]  # the epoch goes on


def test_encoder_truncation_eos_and_request() -> None:
    cfg = LearnerConfig(mode="supervised", max_prompt_tokens=3, sampling={"n": 4, "seed": 10})
    enc = PromptEncoder(CharTokenizer(), cfg)
    assert enc.pad_id == 0  # no pad token: fall back to eos
    assert enc.prompt(SupervisedRow(prompt="12+7=", answer="19")) == [ord(c) for c in "+7="]  # keeps the end
    assert enc.prompt(UnsupervisedRow(text="abcdef")) == [ord(c) for c in "abc"]  # a document: keeps the start
    assert enc.prompt(UnsupervisedRow(prompt="abcdef")) == [ord(c) for c in "def"]  # a prompt: keeps the end
    assert enc.strip_eos([5, 6, 0]) == [5, 6] and enc.strip_eos([5, 6]) == [5, 6] and enc.strip_eos([0]) == []
    request = enc.rollout_request([[1], [2]], "policy", step=3)
    # 10 + 2 earlier steps * 4 prompts per step (the default) * 4 completions each
    assert (request.n, request.seed, request.adapter) == (4, 42, "policy")


@pytest.mark.parametrize(("prompts_per_step", "n"), [(1, 1), (3, 4), (4, 8)])
def test_sampling_seeds_never_repeat_within_or_across_steps(prompts_per_step: int, n: int) -> None:
    # Completion j of prompt i samples with request.seed + i * n + j: the server gives prompt i
    # seed + i * n (RolloutRequest.seed), and vLLM gives child j of an n > 1 request seed + j
    # (vllm/v1/engine/parallel_sampling.py). Steps 1..5 together must use each seed once, from 10 on.
    cfg = LearnerConfig(prompts_per_step=prompts_per_step, sampling={"n": n, "seed": 10})
    enc = PromptEncoder(CharTokenizer(), cfg)
    seeds = []
    for step in range(1, 6):
        request = enc.rollout_request([[1]] * prompts_per_step, None, step=step)
        seeds += [request.seed + i * request.n + j for i in range(prompts_per_step) for j in range(n)]
    assert sorted(seeds) == list(range(10, 10 + 5 * prompts_per_step * n))


@pytest.mark.parametrize("ranks", [2, 4])
def test_the_ranks_shards_draw_the_seeds_of_the_one_process_step(ranks: int) -> None:
    # Completion j of prompt i samples with request.seed + i * n + j (as above). Rank r of W sends
    # prompts r * 4/W ... of the step's 4, from first_prompt = r * 4/W: each completion keeps the
    # seed it has in one process's request, so the ranks draw the same completions between them.
    cfg = LearnerConfig(prompts_per_step=4, sampling={"n": 3, "seed": 10})
    enc = PromptEncoder(CharTokenizer(), cfg)
    whole = enc.rollout_request([[1]] * 4, None, step=2)
    one_process = [whole.seed + i * 3 + j for i in range(4) for j in range(3)]
    shard = 4 // ranks
    by_ranks = []
    for rank in range(ranks):
        request = enc.rollout_request([[1]] * shard, None, step=2, first_prompt=rank * shard)
        by_ranks += [request.seed + i * 3 + j for i in range(shard) for j in range(3)]
    assert by_ranks == one_process == list(range(10 + 12, 10 + 24))  # step 2 starts after step 1's 12


def test_no_sampling_seed_sends_none() -> None:
    enc = PromptEncoder(CharTokenizer(), LearnerConfig())
    assert enc.rollout_request([[1]], None, step=1).seed is None
