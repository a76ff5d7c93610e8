"""Reward functions: TRL-style Python functions loaded by path and called as TRL calls them, mixed
with built-ins by weight, None as "does not apply", and every failure named before any update."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, TrainerState

from learner import reward_funcs, scoring
from learner.advantages import group_normalize
from learner.cli import main, parse_config
from learner.learn import Learned, learn_from
from learner.model import load_policy
from learner.prompts import SupervisedRow, UnsupervisedRow
from learner.rewards import weighted_reward_sum
from learner.server_link import ServerLink
from learner.tiny_model import write_tokenizer
from shared.config import LearnerConfig
from shared.errors import ConfigError, RewardFunctionError
from shared.schemas import ChatMessage, Completion, PromptRollout, RolloutRequest, RolloutResponse, SampleScores

EXACT = "tests/reward_fns/exact_match.py:exact_match"
PROBES = "tests/reward_fns/probes.py"
EOS = 0  # the character decoder's end of sequence


class CharTokenizer:
    """A character tokenizer: token id = code point; EOS is 0 and no token is special."""

    eos_token_id = EOS

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(map(ord, text))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(map(chr, ids))


def python_rewards(
    cfg: LearnerConfig,
    rows_P: list,
    texts_P_G: list[list[str]],
    step: int = 1,
    *,
    fns: list[Callable] | None = None,
    tokenizer=CharTokenizer(),
    global_step: int | None = None,
):
    """rewards_P_G and components_P_G of Python functions only (cfg's, or `fns` as they are): no
    built-in, so no policy. Each completion is the text's tokens and `tokenizer`'s EOS; a training
    step's state by default (global_step = step - 1 done)."""
    text_ids_P_G = [[tokenizer.encode(t, add_special_tokens=False) for t in g] for g in texts_P_G]
    completions = [
        [
            Completion(
                text=t, token_ids=[*ids, tokenizer.eos_token_id], logprobs=[-1.0] * (len(ids) + 1), finish_reason="stop"
            )
            for t, ids in zip(g, ids_G, strict=True)
        ]
        for g, ids_G in zip(texts_P_G, text_ids_P_G, strict=True)
    ]
    prompt_ids_P = [[1] for _ in rows_P]
    funcs = (
        reward_funcs.load(cfg)
        if fns is None
        else [reward_funcs.RewardFunc(f.__name__, f.__name__, 1.0, builtin=None, fn=f) for f in fns]
    )
    assert all(f.builtin is None for f in funcs)
    return reward_funcs.score(
        funcs,
        None,
        prompt_ids_P,
        completions,
        text_ids_P_G,
        None,
        rows_P,
        tokenizer.decode,
        cfg,
        pad_id=0,
        step=step,
        global_step=step - 1 if global_step is None else global_step,
    )


# --- weighted sum: pure math ----------------------------------------------------------------------

NAN = math.nan


@pytest.mark.parametrize(
    ("rewards_F", "weights_F", "want"),
    [
        ([1.0, 4.0], [1.0, 0.5], 3.0),  # 1 * 1 + 0.5 * 4
        ([1.0, NAN], [1.0, 0.5], 1.0),  # the second does not apply: adds nothing (not NaN, not a 0 mean)
        ([NAN, NAN], [1.0, 0.5], NAN),  # none applies: unscorable, NaN as in TRL 1.16 (not nansum's 0)
        ([2.0, -2.0], [1.0, 1.0], 0.0),  # opposite votes cancel
        ([3.0, 5.0], [0.0, 1.0], 5.0),  # weight 0 silences a function
        ([1e30, 1.0], [1.0, 1.0], 1e30),  # huge magnitudes stay finite in float32
        ([7.0], [-1.0], -7.0),  # a negative weight is a penalty
    ],
)
def test_weighted_reward_sum_skips_what_does_not_apply(rewards_F: list, weights_F: list, want: float) -> None:
    got = weighted_reward_sum(torch.tensor([[rewards_F]]), torch.tensor(weights_F))
    torch.testing.assert_close(got, torch.tensor([[want]]), equal_nan=True)


def test_weighted_reward_sum_of_an_empty_batch_is_empty() -> None:
    assert weighted_reward_sum(torch.zeros(0, 4, 2), torch.ones(2)).shape == (0, 4)


# --- loading ---------------------------------------------------------------------------------------


def test_flags_give_functions_and_weights() -> None:
    cfg = parse_config(
        ["--mode", "supervised", "--reward-funcs", "answer_perplexity", EXACT, "--reward-weights", "0.5", "2"]
    )
    assert cfg.reward_funcs == ["answer_perplexity", EXACT] and cfg.reward_weights == [0.5, 2.0]
    funcs = reward_funcs.load(cfg)
    assert [(f.name, f.weight, f.builtin) for f in funcs] == [
        ("answer_perplexity", 0.5, "answer_perplexity"),
        ("exact_match", 2.0, None),
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--reward-funcs", "a", "b", "--reward-weights", "1"], "reward_weights has 1 values for 2 reward_funcs"),
        (["--reward-weights", "1"], "reward_weights needs reward_funcs"),
        (["--reward-funcs"], "reward_funcs: List should have at least 1 item"),
        (["--reward-funcs", "a", "--reward-weights", "nan"], "reward_weights.0: Input should be a finite number"),
    ],
)
def test_weights_that_do_not_fit_are_a_config_error(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(flags)


@pytest.mark.parametrize(
    ("mode", "entry", "message"),
    [
        ("unsupervised", "completion_nll", "'completion_nll' is no built-in reward"),  # a typo of a built-in
        ("unsupervised", "answer_perplexity", "'answer_perplexity' scores the data's answers: supervised mode only"),
        ("supervised", "tests/reward_fns/nowhere.py:f", r"no file tests/reward_fns/nowhere.py"),
        ("supervised", f"{PROBES}:missing", r"'tests/reward_fns/probes.py:missing'.* has no 'missing'"),
        ("supervised", f"{PROBES}:NOT_CALLABLE", "NOT_CALLABLE is a int, not a function"),
        ("supervised", "no_such_package.rewards:f", "no module 'no_such_package'"),
        ("supervised", "tests.reward_fns.exact_match:nope", "has no 'nope'"),
    ],
)
def test_each_bad_entry_is_a_config_error_naming_it(mode: str, entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        reward_funcs.load(LearnerConfig(mode=mode, reward_funcs=["completion_log_likelihood", entry]))
    assert repr(entry) in str(e.value)


def test_two_entries_of_one_name_are_refused() -> None:
    entries = [EXACT, "tests.reward_fns.exact_match:exact_match"]  # one function, by file and by module
    with pytest.raises(ConfigError, match="two entries are named 'exact_match'"):
        reward_funcs.load(LearnerConfig(reward_funcs=entries))


def test_a_file_runs_once_however_often_it_is_loaded() -> None:
    first = reward_funcs.load(LearnerConfig(reward_funcs=[EXACT]))[0].fn
    assert reward_funcs.load(LearnerConfig(reward_funcs=[EXACT]))[0].fn is first


def test_a_bad_entry_exits_2_before_the_model_loads(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        # --model points nowhere: reaching the model would fail differently
        main(
            ["--mode", "supervised", "--data", "examples/supervised.jsonl", "--model", str(tmp_path / "none")]
            + ["--output-dir", str(tmp_path), "--reward-funcs", f"{PROBES}:typo"]
        )
    assert e.value.code == 2
    assert f"'{PROBES}:typo': {PROBES} has no 'typo'" in capsys.readouterr().err


# --- calling Python functions ---------------------------------------------------------------------


def test_a_trl_reward_function_gets_trls_arguments_and_runs_unchanged() -> None:
    cfg = LearnerConfig(mode="supervised", reward_funcs=[EXACT, f"{PROBES}:record"])
    rows = [
        SupervisedRow(prompt="2+3=", answer="5", extra={"level": 1}),
        SupervisedRow(prompt=[ChatMessage(role="user", content="1+1=")], answer="2"),
    ]
    rewards_P_G, components_P_G = python_rewards(cfg, rows, [["5", " 5 ", "6"], ["2", "", "22"]])
    # exact_match: equal after strip(); the chat row's completion is a message.
    want_P_G = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(components_P_G["exact_match"], want_P_G, rtol=0, atol=0)
    torch.testing.assert_close(rewards_P_G, want_P_G, rtol=0, atol=0)  # + record's zeros
    seen = reward_funcs.load(cfg)[1].fn.seen
    chat = [{"role": "user", "content": "1+1="}]
    assert seen["prompts"] == ["2+3="] * 3 + [chat] * 3  # N = P * G, prompt by prompt
    assert seen["completions"][:3] == ["5", " 5 ", "6"]
    assert seen["completions"][3:] == [[{"role": "assistant", "content": t}] for t in ["2", "", "22"]]
    assert seen["completion_ids"][0] == [ord("5"), EOS]  # as sampled: end-of-sequence included
    assert seen["answer"] == ["5"] * 3 + ["2"] * 3  # a supervised row's answer is a column
    assert seen["level"] == [1] * 3 + [None] * 3  # a column a row lacks is None there
    # TRL 1.16's keywords exactly (but log_extra and log_metric): its three, the state, the columns.
    assert set(seen) == {"prompts", "completions", "completion_ids", "trainer_state", "answer", "level"}


def test_a_renamed_answer_column_also_reaches_functions_under_its_own_name() -> None:
    # --answer-key solution: TRL's accuracy_reward(completions, solution, **kwargs) takes `solution`
    cfg = LearnerConfig(mode="supervised", answer_key="solution", reward_funcs=[f"{PROBES}:record"])
    python_rewards(cfg, [SupervisedRow(prompt="2+3=", answer="5")], [["5", "6"]])
    seen = reward_funcs.load(cfg)[0].fn.seen
    assert seen["solution"] == ["5", "5"] and seen["answer"] == ["5", "5"]


def test_async_functions_run_concurrently_and_mix_with_sync_ones() -> None:
    # meet_two and meet_three each wait until both have started: awaited one after the other,
    # the first would wait alone and raise.
    cfg = LearnerConfig(reward_funcs=[f"{PROBES}:meet_two", f"{PROBES}:length_or_none", f"{PROBES}:meet_three"])
    rewards_P_G, components_P_G = python_rewards(cfg, [UnsupervisedRow(text="hi")], [["abc", "de"]])
    torch.testing.assert_close(components_P_G["meet_three"], torch.tensor([[3.0, 3.0]]), rtol=0, atol=0)
    torch.testing.assert_close(rewards_P_G, torch.tensor([[2 + 3 + 3.0, 2 + 2 + 3.0]]), rtol=0, atol=0)
    assert list(components_P_G) == ["meet_two", "length_or_none", "meet_three"]  # the configured order


def test_none_adds_nothing_and_a_completion_nothing_applies_to_is_unscorable(caplog) -> None:
    cfg = LearnerConfig(reward_funcs=[EXACT, f"{PROBES}:length_or_none"], reward_weights=[2.0, 0.5])
    rows = [UnsupervisedRow(text="2+3=", extra={"answer": "5"}), UnsupervisedRow(text="hi")]  # no answer: None
    with caplog.at_level(logging.WARNING, logger="learner"):
        rewards_P_G, components_P_G = python_rewards(cfg, rows, [["5", "56"], ["", "ab"]], step=4)
    # exact_match: [1, 0 | None, None]; length_or_none: [1, 2 | None (empty), 2].
    nan = torch.nan
    torch.testing.assert_close(components_P_G["exact_match"], torch.tensor([[1.0, 0.0], [nan, nan]]), equal_nan=True)
    torch.testing.assert_close(components_P_G["length_or_none"], torch.tensor([[1.0, 2.0], [nan, 2.0]]), equal_nan=True)
    # 2 * 1 + 0.5 * 1 | 2 * 0 + 0.5 * 2 || nothing applies: NaN (unscorable) | 0.5 * 2
    torch.testing.assert_close(rewards_P_G, torch.tensor([[2.5, 1.0], [nan, 1.0]]), rtol=0, atol=0, equal_nan=True)
    assert "step 4: no reward function applies to 1 completion(s)" in caplog.text
    assert "completion 0 of prompt 'hi'" in caplog.text


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("raises", r"raised ValueError: the judge is down \(probes.py:\d+\)"),
        ("raises_async", r"raised ValueError: the async judge is down \(probes.py:\d+\)"),
        ("one_short", "returned 3 rewards for 4 completions"),
        ("a_number", "returned a float, not a list of 4 rewards"),
        ("a_tuple_of_strings", r"returned '1.0' \(str\) for completion 0: not a number or None"),
        ("infinite", "returned inf for completion 0: rewards are finite numbers, or None"),
    ],
)
def test_a_failing_function_is_named_with_the_step(name: str, message: str) -> None:
    cfg = LearnerConfig(reward_funcs=[EXACT, f"{PROBES}:{name}"])
    with pytest.raises(RewardFunctionError, match=message) as e:
        python_rewards(cfg, [UnsupervisedRow(text="a"), UnsupervisedRow(text="b")], [["x", "y"], ["z", "w"]], step=7)
    assert str(e.value).startswith(f"reward function '{PROBES}:{name}' at step 7: ")


def test_scores_are_posted_with_none_where_a_function_or_every_function_did_not_apply() -> None:
    class Client:  # the RolloutClient methods a rollout and post_scores call
        def generate(self, request: RolloutRequest, *, expected_version: int) -> RolloutResponse:
            completions = [Completion(text="", token_ids=[1], logprobs=[-1.0], finish_reason="length")] * request.n
            result = PromptRollout(prompt=None, prompt_token_ids=request.prompt_token_ids[0], completions=completions)
            return RolloutResponse(
                rollout_id="r1", adapter=None, policy_version=0, results=[result], created_at=datetime.now(UTC)
            )

        def post_scores(self, rollout_id: str, scores: SampleScores) -> None:
            self.posted = (rollout_id, scores)

    client = Client()
    link = ServerLink([client], LearnerConfig(), canary=None)
    link.rollout(RolloutRequest(prompt_token_ids=[[5]], n=3, max_tokens=1))
    nan = torch.nan
    components = {"exact_match": torch.tensor([[1.0, nan, nan]]), "length": torch.tensor([[2.0, 3.0, nan]])}
    rewards_P_G = torch.tensor([[3.0, 3.0, nan]])  # the third: unscorable
    learned = Learned(rewards_P_G, torch.tensor([[0.0, 0.0, 0.0]]), None, score_s=0.0, components_P_G=components)
    link.post_scores("r1", learned.sample_scores(3), 3)
    rollout_id, scores = client.posted
    assert rollout_id == "r1" and scores.step == 3
    assert scores.rewards == [[3.0, 3.0, None]] and scores.advantages == [[0.0, 0.0, 0.0]]
    assert scores.components == {"exact_match": [[1.0, None, None]], "length": [[2.0, 3.0, None]]}


# --- TRL's return styles and keywords, by functions of TRL's signature written here ---------------


def numpy_lengths(completions, **kwargs):
    """A numpy array (np.array over a list comprehension): TRL takes it."""
    return np.array([float(len(c)) for c in completions])


def tensor_lengths(completions, **kwargs):
    """One 1-d tensor."""
    return torch.tensor([float(len(c)) for c in completions])


def zero_d_tensor_lengths_or_none(completions, **kwargs):
    """A list of 0-d tensors (a judge model's scores, one .sum() each), None for an empty completion."""
    return [torch.tensor(len(c), dtype=torch.float64) if c else None for c in completions]


def numpy_scalar_lengths_or_nan(completions, **kwargs):
    """numpy scalars (float32, int64 and bool), NaN for an empty completion (TRL: does not apply)."""
    return [np.float32(len(c)) if len(c) > 2 else np.int64(len(c)) if c else np.float32("nan") for c in completions]


def numpy_bools(completions, **kwargs):
    """numpy booleans (an elementwise ==), 1.0 for True."""
    return list(np.array([len(c) for c in completions]) == 2)


@pytest.mark.parametrize(
    ("fn", "want"),
    [
        (numpy_lengths, [3.0, 2.0, 0.0]),  # float64 array, one reward per completion
        (tensor_lengths, [3.0, 2.0, 0.0]),  # float32 tensor
        (zero_d_tensor_lengths_or_none, [3.0, 2.0, math.nan]),  # None: does not apply (NaN)
        (numpy_scalar_lengths_or_nan, [3.0, 2.0, math.nan]),  # np.int64 2 for "de"; NaN kept as NaN
        (numpy_bools, [0.0, 1.0, 0.0]),  # np.bool_: only "de" has length 2
    ],
)
def test_rewards_in_every_return_style_trl_takes_are_taken(fn: Callable, want: list[float]) -> None:
    _, components_P_G = python_rewards(LearnerConfig(), [UnsupervisedRow(text="hi")], [["abc", "de", ""]], fns=[fn])
    torch.testing.assert_close(components_P_G[fn.__name__], torch.tensor([want]), rtol=0, atol=0, equal_nan=True)


def nested(completions, **kwargs):
    return [torch.tensor([1.0]) for _ in completions]  # a 1-element 1-d tensor per completion: shape [N, 1]


def matrix(completions, **kwargs):
    return np.ones((len(completions), 1))


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (nested, r"returned tensor\(\[1.\]\) \(Tensor\) for completion 0: not a number or None"),
        (matrix, r"returned an array of shape \(2, 1\), not one reward per completion"),
    ],
)
def test_arrays_that_are_not_one_number_per_completion_are_refused(fn: Callable, message: str) -> None:
    with pytest.raises(RewardFunctionError, match=message):
        python_rewards(LearnerConfig(), [UnsupervisedRow(text="hi")], [["a", "b"]], fns=[fn])


def test_completions_are_decoded_without_special_tokens_as_trls(tmp_path: Path) -> None:
    write_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)

    def seen(completions, completion_ids, **kwargs):
        seen.args = (completions, completion_ids)
        return [0.0] * len(completions)

    text = "<|im_start|>12<|im_end|>\n<|im_start|>13"  # the tiny model's chat tokens are special
    python_rewards(LearnerConfig(), [UnsupervisedRow(text="hi")], [[text]], fns=[seen], tokenizer=tokenizer)
    completions, completion_ids = seen.args
    assert completions == ["12\n13"]  # TRL: batch_decode(completion_ids, skip_special_tokens=True)
    # The ids keep them all, and the end of sequence (as TRL's completion_ids).
    assert completion_ids == [[*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]]


def test_functions_get_trls_trainer_state_for_a_schedule() -> None:
    """TRL passes its transformers TrainerState: global_step is the updates done so far."""

    def progress(completions, trainer_state, **kwargs):  # a curriculum over the run, TRL-style
        assert isinstance(trainer_state, TrainerState)
        return [trainer_state.global_step / trainer_state.max_steps] * len(completions)

    cfg = LearnerConfig(steps=10)
    _, components_P_G = python_rewards(cfg, [UnsupervisedRow(text="hi")], [["a", "b"]], step=3, fns=[progress])
    torch.testing.assert_close(components_P_G["progress"], torch.tensor([[0.2, 0.2]]))  # 2 of 10 done at step 3
    # An evaluation after step 4 (Evaluation passes global_step = step): 4 of 10 done.
    _, components_P_G = python_rewards(
        cfg, [UnsupervisedRow(text="hi")], [["a"]], step=4, fns=[progress], global_step=4
    )
    torch.testing.assert_close(components_P_G["progress"], torch.tensor([[0.4]]))
    # A required argument of that name is no column the data must have.
    func = reward_funcs.RewardFunc("progress", "progress", 1.0, builtin=None, fn=progress)
    reward_funcs.check_columns([func], [UnsupervisedRow(text="hi")], cfg)


def test_trls_own_reward_functions_run_unchanged() -> None:
    """TRL's reward functions, imported from trl (the dev group installs trl[math-verify] 1.16)."""
    pytest.importorskip("trl.rewards", reason="trl is in the dev group: uv sync installs it")
    pytest.importorskip("math_verify", reason="trl[math-verify] is in the dev group: uv sync installs it")
    cfg = LearnerConfig(reward_funcs=["trl.rewards:think_format_reward", "trl.rewards:accuracy_reward"])
    chat = [ChatMessage(role="user", content="What is 1/3 of 1?")]
    rows = [
        UnsupervisedRow(prompt=chat, extra={"solution": r"\frac{1}{3}"}),
        UnsupervisedRow(prompt=chat, extra={"solution": "no number here"}),  # gold unparsable: None
    ]
    texts_P_G = [
        [r"<think>a third</think>\boxed{\frac{1}{3}}", r"\boxed{\frac{1}{2}}"],
        [r"<think>x</think>\boxed{1}", "<think>x"],
    ]
    reward_funcs.check_columns(reward_funcs.load(cfg), rows, cfg)  # accuracy_reward's `solution` is a column
    rewards_P_G, components_P_G = python_rewards(cfg, rows, texts_P_G)
    # think_format_reward: 1 when the completion opens with one closed <think> block.
    torch.testing.assert_close(components_P_G["think_format_reward"], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    # accuracy_reward: 1/3 right, 1/2 wrong; None (NaN) where the gold solution does not parse.
    nan = math.nan
    torch.testing.assert_close(
        components_P_G["accuracy_reward"], torch.tensor([[1.0, 0.0], [nan, nan]]), equal_nan=True
    )
    torch.testing.assert_close(rewards_P_G, torch.tensor([[2.0, 0.0], [1.0, 0.0]]))  # None adds nothing


# --- with the policy: built-ins and Python functions together ----------------------------------------


@pytest.fixture
def tiny_policy(tiny_model_dir: Path):
    """The tiny model with a LoRA that is not a no-op, and its tokenizer."""
    torch.manual_seed(0)
    policy, tokenizer = load_policy(str(tiny_model_dir), LearnerConfig())
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return policy, tokenizer


ROWS = [SupervisedRow(prompt="2+3=", answer="5"), SupervisedRow(prompt="4+4=", answer="8")]
TEXTS_P_G = [["5", "15", "6"], ["8", "8", "9 9"]]
EXACT_P_G = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]  # exact_match of TEXTS_P_G: "5" | "15", "6" || "8", "8" | "9 9"


def tokenized(tokenizer) -> tuple[list[list[int]], list[list[list[int]]], list[list[int]]]:
    """prompt_ids_P, text_ids_P_G and answer_ids_P of ROWS and TEXTS_P_G."""
    prompt_ids_P = [tokenizer.encode(row.prompt) for row in ROWS]
    text_ids_P_G = [[tokenizer.encode(t) for t in g] for g in TEXTS_P_G]
    return prompt_ids_P, text_ids_P_G, [tokenizer.encode(row.answer) for row in ROWS]


def learn_step(policy, tokenizer, optimizer, cfg: LearnerConfig, *, step: int = 1):
    """learn_from on ROWS and TEXTS_P_G, each completion stopped by the tokenizer's EOS."""
    prompt_ids_P, text_ids_P_G, answer_ids_P = tokenized(tokenizer)
    eos = tokenizer.eos_token_id
    completions = [
        [
            Completion(text="", token_ids=[*ids, eos], logprobs=[-2.0] * (len(ids) + 1), finish_reason="stop")
            for ids in g
        ]
        for g in text_ids_P_G
    ]
    return learn_from(
        policy,
        optimizer,
        prompt_ids_P,
        completions,
        text_ids_P_G,
        answer_ids_P,
        cfg,
        pad_id=0,
        reward_fns=reward_funcs.load(cfg),
        rows_P=ROWS,
        decode=tokenizer.decode,
        step=step,
    )


def test_a_function_and_a_built_in_sum_by_weight(tiny_policy) -> None:
    policy, tokenizer = tiny_policy
    cfg = LearnerConfig(mode="supervised", reward_funcs=[EXACT, "answer_perplexity"], reward_weights=[1.0, 0.5])
    # The built-in alone, as the mode's reward, scored before the update changes the policy.
    alone_cfg = LearnerConfig(mode="supervised", reward="answer_perplexity")
    prompt_ids_P, text_ids_P_G, answer_ids_P = tokenized(tokenizer)
    perplexity_P_G = scoring.score(policy, prompt_ids_P, text_ids_P_G, answer_ids_P, alone_cfg, pad_id=0)
    exact_P_G = torch.tensor(EXACT_P_G)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    learned = learn_step(policy, tokenizer, optimizer, cfg)
    torch.testing.assert_close(learned.components_P_G["answer_perplexity"], perplexity_P_G)
    torch.testing.assert_close(learned.components_P_G["exact_match"], exact_P_G, rtol=0, atol=0)
    torch.testing.assert_close(learned.rewards_P_G, 1.0 * exact_P_G + 0.5 * perplexity_P_G)
    want_advantages = group_normalize(learned.rewards_P_G, eps=cfg.advantage_eps, scale_rewards="group")
    torch.testing.assert_close(learned.advantages_P_G, want_advantages)
    assert not learned.stats.skipped and learned.score_s > 0


def test_a_failing_function_leaves_the_policy_and_optimizer_untouched(tiny_policy) -> None:
    policy, tokenizer = tiny_policy
    cfg = LearnerConfig(mode="supervised", reward_funcs=["answer_perplexity", f"{PROBES}:raises"])
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    rows = []
    hook = (
        policy.get_base_model()
        .get_decoder()
        .register_forward_pre_hook(lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    )
    try:
        with pytest.raises(
            RewardFunctionError, match=f"reward function '{PROBES}:raises' at step 9: raised ValueError"
        ):
            learn_step(policy, tokenizer, optimizer, cfg, step=9)
    finally:
        hook.remove()
    assert rows == []  # Python functions run first: not even the built-in's scoring pass ran
    for name, param in policy.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.grad is None, name
    assert optimizer.state_dict()["state"] == {}  # no step taken


def test_a_functions_required_argument_that_is_no_column_is_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It failed at step 1, ~50 s in, after the server had started: `accuracy_reward() missing 1
    required positional argument: 'solution'`."""
    fn = [f"{PROBES}:accuracy_reward"]
    rows = [SupervisedRow(prompt="2+3=", answer="5")]
    with pytest.raises(ConfigError, match=r"'solution' are not columns of every row of .* \(its columns: answer\)"):
        reward_funcs.check_columns(
            reward_funcs.load(LearnerConfig(mode="supervised", reward_funcs=fn)), rows, LearnerConfig()
        )
    renamed = LearnerConfig(mode="supervised", answer_key="solution", reward_funcs=fn)  # the column, by its name
    reward_funcs.check_columns(reward_funcs.load(renamed), rows, renamed)
    argv = ["--mode", "supervised", "--data", "examples/supervised.jsonl", "--reward-funcs", *fn]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--model", str(tmp_path / "none"), "--output-dir", str(tmp_path)])  # no model is reached
    assert e.value.code == 2 and "'solution' are not columns" in capsys.readouterr().err
