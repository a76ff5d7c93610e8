"""Evaluation's figures, from hand-made completions (the served-version path is in
test_learner_integration.py)."""

from __future__ import annotations

import math

import pytest
import torch

from learner.evaluate import eval_metrics, exact_match_P_G
from learner.prompts import SupervisedRow
from shared.config import LearnerConfig


def test_exact_match_compares_the_decoded_completion_with_the_answer_stripped() -> None:
    rows_P = [SupervisedRow(prompt="1+1=", answer=" 2"), SupervisedRow(prompt="2+2=", answer="4")]
    texts = {1: "2", 2: "2 ", 3: "22", 4: "4\n", 5: ""}
    text_ids_P_G = [[[1], [2], [3]], [[4], [5], [1]]]

    exact_P_G = exact_match_P_G(rows_P, text_ids_P_G, lambda ids: texts[ids[0]])

    assert exact_P_G.tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_eval_metrics_are_means_over_every_completion_and_nan_aware_per_function() -> None:
    rewards_N = torch.tensor([0.0, 1.0, 0.5, 0.5])
    components_N = {
        "answer_perplexity": torch.tensor([0.0, 1.0, 0.5, 0.5]),
        "judge": torch.tensor([1.0, math.nan, 0.0, math.nan]),
    }

    metrics = eval_metrics(
        rewards_N,
        components_N,
        [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])],
        [3, 5, 4, 4],
        [False, True, False, False],
    )

    assert metrics == pytest.approx(
        {
            "reward_mean": 0.5,
            "reward_std": math.sqrt((0.25 + 0.25 + 0 + 0) / 4),
            "completions": 4.0,
            "completion_len": 4.0,
            "clipped_ratio": 0.25,
            "rewards/answer_perplexity/mean": 0.5,
            "rewards/judge/mean": 0.5,  # the NaNs (not applicable) are left out
            "exact_match": 0.25,
        }
    )


def test_unsupervised_evaluation_has_no_exact_match() -> None:
    metrics = eval_metrics(torch.tensor([-2.0, -4.0]), {}, [], [1, 1], [False, False])
    assert "exact_match" not in metrics and metrics["reward_mean"] == -3.0


def test_eval_steps_needs_held_out_rows() -> None:
    with pytest.raises(ValueError, match="eval_data or eval_fraction"):
        LearnerConfig(eval_steps=5)
    assert LearnerConfig(eval_steps=5, eval_fraction=0.2).eval_steps == 5
