"""RunLog on its own (no model, no server): metrics.jsonl rows, eval rows, each step's samples file."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from learner.distributed import Distributed
from learner.learn import Learned
from learner.run_log import RunLog, StepFigures, drop_steps_after, reward_function_stats
from learner.update import UpdateStats
from shared.config import LearnerConfig
from shared.schemas import ChatMessage, Completion, PromptRollout, RolloutResponse, SampleRecord

NAN = math.nan
STATS = UpdateStats(
    loss=0.1,
    kl=0.01,
    clip_fraction=0.0,
    is_weight=1.0,
    sampler_gap=0.001,
    sampler_gap_p50=0.001,
    sampler_gap_p99=0.002,
    is_weight_p50=1.0,
    is_weight_p99=1.0,
    is_masked=0.0,
    clamped_tokens=0,
    grad_norm=0.5,
    skipped=False,
)
# phases of a 2-second step: 4 completions in it make 2 completions/s
SECONDS = {"generate": 1.25, "score": 0.25, "update": 0.25, "swap": 0.25}


def rollout(finish_reasons_P_G: list[list[str]]) -> RolloutResponse:
    """A rollout of len(finish_reasons_P_G) prompts sent as token ids, completion (p, g) of g + 1 tokens."""
    return RolloutResponse(
        rollout_id="r-1",
        adapter="policy",
        policy_version=3,
        created_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        results=[
            PromptRollout(
                prompt=None,
                prompt_token_ids=[1, 2, p],
                completions=[
                    Completion(
                        text=f"c{p}{g}", token_ids=[7] * (g + 1), logprobs=[-0.5] * (g + 1), finish_reason=reason
                    )
                    for g, reason in enumerate(reasons)
                ],
            )
            for p, reasons in enumerate(finish_reasons_P_G)
        ],
    )


def learned(rewards: list[list[float]], components: dict[str, list[list[float]]] | None = None) -> Learned:
    rewards_P_G = torch.tensor(rewards)
    advantages_P_G = rewards_P_G - rewards_P_G.mean(dim=1, keepdim=True)
    components_P_G = {name: torch.tensor(v) for name, v in (components or {}).items()}
    return Learned(rewards_P_G, advantages_P_G, STATS, score_s=0.25, components_P_G=components_P_G)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def cfg(tmp_path: Path) -> LearnerConfig:
    return LearnerConfig(output_dir=tmp_path / "run", steps=10, sample_every=0)


def log_step(log: RunLog, step: int, version: int, sent: RolloutResponse, scored: Learned, **kwargs) -> None:
    """`log.step` of a step that is all one process's (`whole`: its own figures), SECONDS long."""
    log.step(step, version, sent, scored, SECONDS, whole=StepFigures.of(sent, scored), **kwargs)


def test_a_step_row_is_on_disk_before_the_log_closes_with_rates_and_per_function_rewards(cfg: LearnerConfig) -> None:
    log = RunLog(cfg)
    try:
        log_step(
            log,
            7,
            4,
            rollout([["length", "stop"], ["stop", "length"]]),
            # "format" applied to the first completion of each prompt; "exact" to none
            learned([[1.0, 0.0], [0.5, 0.5]], {"format": [[1.0, NAN], [0.0, NAN]], "exact": [[NAN, NAN], [NAN, NAN]]}),
            prompts=["1+1=", "2+2="],
        )
        (row,) = rows(log.path)  # read while the file is still open: `tail -f` sees the step
    finally:
        log.close()
    assert row["step"] == 7 and row["policy_version"] == 4
    assert row["completions_per_s"] == 2.0  # 4 completions / (1.25 + 0.25 + 0.25 + 0.25) s
    assert row["clipped_ratio"] == 0.5  # 2 of 4 finished at max_tokens
    assert row["completion_len"] == 1.5  # tokens 1, 2, 1, 2
    assert row["reward_mean"] == 0.5  # (1 + 0 + 0.5 + 0.5) / 4
    # format over its two values 1 and 0: mean 0.5, population std 0.5
    assert row["rewards/format/mean"] == 0.5 and row["rewards/format/std"] == 0.5
    # exact applied to nothing: NaN, which JSON writes as null
    assert row["rewards/exact/mean"] is None and row["rewards/exact/std"] is None
    assert row["time_generate"] == 1.25 and row["kl"] == 0.01


def test_under_torchrun_the_row_is_the_whole_steps_and_the_samples_file_rank_0s_shard(cfg: LearnerConfig) -> None:
    # Rank 0's shard: prompt 0 of 2. The whole step (what StepFigures.gather gives rank 0) adds
    # rank 1's prompt: completions of 1, 2, 1, 2 tokens, 2 of 4 at max_tokens, rewards 1, 0, 0.5, 0.5.
    mine, mine_learned = rollout([["stop", "stop"]]), learned([[1.0, 0.0]], {"format": [[1.0, NAN]]})
    theirs, theirs_learned = rollout([["length", "length"]]), learned([[0.5, 0.5]], {"format": [[0.0, NAN]]})
    whole = StepFigures(
        torch.cat([mine_learned.rewards_P_G, theirs_learned.rewards_P_G]),
        {"format": torch.tensor([[1.0, NAN], [0.0, NAN]])},
        torch.cat(
            [
                StepFigures.of(mine, mine_learned).completion_lens_N,
                StepFigures.of(theirs, theirs_learned).completion_lens_N,
            ]
        ),
        torch.tensor([0, 0, 1, 1]),
    )
    log = RunLog(cfg)
    log.step(3, 2, mine, mine_learned, SECONDS, prompts=["1+1="], whole=whole)
    log.close()
    (row,) = rows(log.path)
    assert row["completions_per_s"] == 2.0  # 4 completions / 2 s
    assert (row["clipped_ratio"], row["completion_len"]) == (0.5, 1.5)
    assert (row["reward_mean"], row["zero_variance_groups"]) == (0.5, 1)  # rank 1's group: 0.5, 0.5
    assert (row["rewards/format/mean"], row["rewards/format/std"]) == (0.5, 0.5)
    (record,) = rows(cfg.output_dir / "samples" / "step_000003.jsonl")
    assert [r["prompt"] for r in record["results"]] == ["1+1="] and record["scores"]["rewards"] == [[1.0, 0.0]]


def test_alone_the_step_figures_gather_to_themselves(cfg: LearnerConfig) -> None:
    figures = StepFigures.of(rollout([["length", "stop"]]), learned([[1.0, 0.0]], {"format": [[1.0, NAN]]}))
    gathered = figures.gather(Distributed())
    assert gathered.rewards_P_G.equal(figures.rewards_P_G) and gathered.clipped_N.equal(figures.clipped_N)
    torch.testing.assert_close(gathered.components_P_G, figures.components_P_G, rtol=0, atol=0, equal_nan=True)
    assert figures.completion_lens_N.tolist() == [1, 2] and figures.clipped_N.tolist() == [1, 0]


def test_a_log_on_another_rank_than_0_writes_nothing(cfg: LearnerConfig) -> None:
    log = RunLog(cfg, ranks=Distributed(rank=1, world_size=2))
    assert not log.writes
    log_step(log, 1, 1, rollout([["stop", "stop"]]), learned([[1.0, 0.0]]), prompts=["p"])
    log.eval(1, {"reward_mean": 0.5})
    log.note("skipped")
    log.close()
    assert not cfg.output_dir.exists()


def test_a_single_builtin_reward_logs_no_per_function_keys(cfg: LearnerConfig) -> None:
    log = RunLog(cfg)
    log_step(log, 1, 1, rollout([["stop", "stop"]]), learned([[1.0, 0.0]]), prompts=["p"])
    log.close()
    (row,) = rows(log.path)
    assert not [k for k in row if k.startswith("rewards/")]
    assert row["clipped_ratio"] == 0.0


@pytest.mark.parametrize(
    ("values", "mean", "std"),
    [
        ([[2.0, 4.0]], 3.0, 1.0),  # all applied: population std of {2, 4} is 1
        ([[2.0, NAN], [NAN, 4.0]], 3.0, 1.0),  # NaNs (not applied) are left out, not counted as 0
        ([[5.0, NAN]], 5.0, 0.0),  # one value: no spread
        ([[NAN, NAN]], NAN, NAN),  # applied to none: no mean
        ([[1e30, -1e30]], 0.0, 1e30),  # huge magnitudes neither overflow nor lose the mean
    ],
)
def test_reward_function_stats(values: list[list[float]], mean: float, std: float) -> None:
    stats = reward_function_stats({"f": torch.tensor(values, dtype=torch.float64)})
    assert stats.keys() == {"rewards/f/mean", "rewards/f/std"}
    torch.testing.assert_close(
        torch.tensor([stats["rewards/f/mean"], stats["rewards/f/std"]], dtype=torch.float64),
        torch.tensor([mean, std], dtype=torch.float64),
        equal_nan=True,
    )


def test_each_step_writes_its_rollout_and_scores_as_a_samples_record(cfg: LearnerConfig) -> None:
    sent = rollout([["stop", "length"], ["stop", "stop"]])
    log = RunLog(cfg)
    log_step(
        log,
        123,
        4,
        sent,
        learned([[1.0, 0.0], [0.5, 0.5]], {"format": [[1.0, NAN], [0.0, 1.0]]}),
        prompts=["a", [ChatMessage(role="user", content="b")]],
    )
    log.close()
    (line,) = (cfg.output_dir / "samples" / "step_000123.jsonl").read_text().splitlines()
    record = SampleRecord.model_validate_json(line)  # GET /v1/samples's schema, as the server checks it
    # the rollout as sent, with each prompt as the data gave it (the learner sends token ids)
    assert [r.prompt for r in record.results] == ["a", [ChatMessage(role="user", content="b")]]
    unprompted = [r.model_copy(update={"prompt": None}) for r in record.results]
    mine = {"scores", "truncated", "run", "kind", "prompt_texts"}
    assert record.model_copy(update={"results": unprompted}).model_dump(exclude=mine) == sent.model_dump()
    assert (record.run, record.kind) == ("run", "training")  # the output directory's name
    assert record.scores is not None and record.scores.step == 123
    assert record.scores.rewards == [[1.0, 0.0], [0.5, 0.5]]
    assert record.scores.advantages == [[0.5, -0.5], [0.0, 0.0]]
    assert record.scores.components == {"format": [[1.0, None], [0.0, 1.0]]}  # NaN: did not apply


def test_scores_json_cannot_hold_leave_the_record_without_scores(cfg: LearnerConfig) -> None:
    log = RunLog(cfg)
    log_step(log, 2, 1, rollout([["stop", "stop"]]), learned([[math.inf, 1.0]]), prompts=["p"])
    log.close()
    record = SampleRecord.model_validate_json((cfg.output_dir / "samples" / "step_000002.jsonl").read_text())
    assert record.scores is None and record.results[0].completions[1].text == "c01"
    assert rows(log.path)[0]["reward_mean"] is None


def test_a_redone_step_replaces_its_samples_file_whole(cfg: LearnerConfig) -> None:
    for reward in (0.0, 1.0):  # the first run, then a resumed run redoing step 5
        log = RunLog(cfg)
        log_step(log, 5, 1, rollout([["stop", "stop"]]), learned([[reward, 0.0]]), prompts=["p"])
        log.close()
    samples = cfg.output_dir / "samples"
    assert [p.name for p in samples.iterdir()] == ["step_000005.jsonl"]  # no temp file left behind
    record = SampleRecord.model_validate_json((samples / "step_000005.jsonl").read_text())
    assert record.scores is not None and record.scores.rewards == [[1.0, 0.0]]


def test_eval_metrics_are_a_row_of_their_own_that_a_resume_drops_with_its_step(cfg: LearnerConfig) -> None:
    log = RunLog(cfg)
    for step in (1, 2):
        log_step(log, step, step, rollout([["stop", "stop"]]), learned([[1.0, 0.0]]), prompts=["p"])
        log.eval(step, {"accuracy": step / 4, "loss": NAN})
    log.close()
    written = rows(log.path)
    assert [(r["step"], "reward_mean" in r) for r in written] == [(1, True), (1, False), (2, True), (2, False)]
    assert {k: v for k, v in written[1].items() if k != "time"} == {"step": 1, "eval/accuracy": 0.25, "eval/loss": None}
    drop_steps_after(log.path, 1)  # resuming from step 1's checkpoint: step 2 is redone, its eval too
    assert [r["step"] for r in rows(log.path)] == [1, 1]


def test_three_steps_of_equal_rewards_in_every_group_warn_once_naming_the_reward(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 20: TRL's think_format_reward on a model that never writes <think>: loss 0 for steps
    on end, and only zero_variance_groups in the metrics said so."""
    cfg = LearnerConfig(output_dir=tmp_path / "run", steps=10, sample_every=0, reward_funcs=["my.rewards:think"])
    log = RunLog(cfg)
    flat, varied = learned([[0.0, 0.0], [1.0, 1.0]]), learned([[0.0, 1.0], [1.0, 1.0]])
    try:
        for step, scored in enumerate([flat, flat, varied, flat, flat, flat, flat, flat], start=1):
            log_step(log, step, step, rollout([["stop", "stop"], ["stop", "stop"]]), scored, prompts=["a", "b"])
    finally:
        log.close()
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    # steps 4, 5, 6 are the first three flat ones running (step 3 varied): one warning, at step 6
    assert len(warnings) == 1 and warnings[0].startswith("[step 6] warning")
    assert "my.rewards:think" in warnings[0] and "nothing is learned" in warnings[0]


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason", "shown"),
    [
        ("stop", "=", 'stop "="'),  # the stop string is left out of the text: an empty text ended on it
        ("stop", None, "end of sequence"),
        ("stop", 7, "stop token 7"),
        ("length", None, "max_tokens"),
    ],
)
def test_a_shown_sample_says_how_it_ended(
    cfg: LearnerConfig, capsys: pytest.CaptureFixture[str], finish_reason: str, stop_reason, shown: str
) -> None:
    log = RunLog(cfg.model_copy(update={"sample_every": 1}))
    sent = rollout([["stop"]])
    sent.results[0].completions[0] = Completion(
        text="", token_ids=[], logprobs=[], finish_reason=finish_reason, stop_reason=stop_reason
    )
    try:
        log_step(log, 1, 1, sent, learned([[0.0]]), prompts=["Your fresh moons washed no"])
    finally:
        log.close()
    assert f"'Your fresh moons washed no' -> '' ({shown})  reward=0.0000" in capsys.readouterr().out
