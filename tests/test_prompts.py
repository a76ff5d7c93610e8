"""JSONL data files are validated row by row, and errors name the file, line and field; rows become
batches and token ids. (Other formats, columns and held-out rows: test_data.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from learner.data import load_rows
from learner.prompts import PromptEncoder, PromptSampler, SupervisedRow, UnsupervisedRow
from learner.tiny_model import CHAT_TEMPLATE, write_tokenizer
from shared.config import LearnerConfig
from shared.errors import ConfigError, DataError
from shared.schemas import ChatMessage

SYSTEM_LAST = '{"prompt": [{"role": "user", "content": "1+1="}, {"role": "system", "content": "Be brief."}]}\n'


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
        # A conversation ends with a turn to answer (user, tool) or to continue (assistant), as TRL's.
        ("unsupervised", SYSTEM_LAST, 1, "prompt.messages", "message 1 is the last, and its role is 'system'"),
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


class CharTokenizer:
    eos_token_id, pad_token_id, bos_token_id = 0, None, None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


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


# --- conversations through the chat template ----------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The tiny model's tokenizer, whose template renders a Qwen3-style empty think block after the
    generation prompt when `enable_thinking` is false (Qwen3's template keyword)."""
    out = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE + (
        "{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
        "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    )
    return tokenizer


def rendered(tokenizer, messages: list[tuple[str, str]], **cfg) -> str:
    """The prompt text the learner samples after: its token ids, decoded."""
    row = UnsupervisedRow(prompt=[ChatMessage(role=role, content=content) for role, content in messages])
    encoder = PromptEncoder(tokenizer, LearnerConfig(max_prompt_tokens=512, **cfg))
    return tokenizer.decode(encoder.prompt(row))


@pytest.mark.parametrize(
    ("messages", "want"),
    [
        # The user asked: the template opens the assistant's turn (the generation prompt).
        ([("user", "12+7=")], "<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\n"),
        # A tool answered: the assistant speaks next, as after a user (TRL: "user" or "tool").
        (
            [("user", "12+7="), ("tool", "19")],
            "<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>tool\n19<|im_end|>\n<|im_start|>assistant\n",
        ),
        # A prefill: the assistant's turn stays open and the completion continues it, with no
        # <|im_end|> closing it and no second assistant header (continue_final_message).
        (
            [("user", "12+7="), ("assistant", "The sum is")],
            "<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\nThe sum is",
        ),
        ([("user", "12+7="), ("assistant", "")], "<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\n"),
    ],
)
def test_a_conversation_is_answered_or_its_assistant_prefill_continued(chat_tokenizer, messages, want: str) -> None:
    assert rendered(chat_tokenizer, messages) == want


def test_chat_template_kwargs_reach_the_template(chat_tokenizer) -> None:
    user = [("user", "12+7=")]
    opened = "<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\n"
    assert rendered(chat_tokenizer, user) == opened  # the keyword unset: no think block
    assert rendered(chat_tokenizer, user, chat_template_kwargs={"enable_thinking": False}) == (
        opened + "<think>\n\n</think>\n\n"
    )
    assert rendered(chat_tokenizer, user, chat_template_kwargs={"enable_thinking": True}) == opened


def test_a_conversation_ending_with_another_role_is_refused_before_any_model_loads(tmp_path: Path, capsys) -> None:
    from learner.cli import main

    data = write(tmp_path, '{"prompt": [{"role": "user", "content": "hi"}]}\n' + SYSTEM_LAST)
    with pytest.raises(SystemExit) as e:  # --model points nowhere: reaching the model would fail differently
        main(["--data", str(data), "--model", str(tmp_path / "none"), "--output-dir", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{data}:2: field 'prompt.messages'" in err and "its role is 'system'" in err


@pytest.mark.parametrize("key", ["add_generation_prompt", "continue_final_message", "tokenize", "chat_template"])
def test_chat_template_kwargs_that_the_rendering_sets_are_refused(key: str) -> None:
    with pytest.raises(
        ValueError, match=f"chat_template_kwargs\n.*{key!r} is set by the rendering, not a chat-template"
    ):
        LearnerConfig(chat_template_kwargs={key: True})


def test_the_chat_template_kwargs_flag_takes_json() -> None:
    from learner.cli import parse_config

    cfg = parse_config(["--chat-template-kwargs", '{"enable_thinking": false}'])
    assert cfg.chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(ConfigError, match="chat_template_kwargs"):
        parse_config(["--chat-template-kwargs", '{"tokenize": true}'])
