"""Evaluation on the held-out rows: completions from the served version, scored like training's.

Every `eval_steps` steps, and before the first, each held-out prompt gets completions from the
version the server serves now: one greedy completion (`eval_sampling: greedy`), or K sampled at
the training temperature with a fixed seed, so evaluations of successive versions compare the
same draws. They are scored by the training reward functions (no gradients), and for
supervised rows compared with the answer. Nothing here touches the policy's weights or the
optimizer; the figures go to metrics.jsonl as `eval/*`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import PeftModel
from torch import Tensor

from learner import reward_funcs
from learner.prompts import PromptEncoder, Row
from learner.reward_funcs import RewardFunc
from learner.run_log import RunLog, nan_mean_std
from learner.server_link import ServerLink
from shared.config import LearnerConfig
from shared.schemas import RolloutRequest

EVAL_SEED = 1_000_003
"""Sampled evaluations draw with this seed (plus the prompt's index), at every evaluation: a
change in the figures is the policy's, not the draw's."""


class Evaluation:
    """The held-out set, and how to evaluate the served version on it."""

    def __init__(
        self,
        cfg: LearnerConfig,
        rows: list[Row],
        encode: PromptEncoder,
        funcs: list[RewardFunc],
        policy: PeftModel,
        decode: Callable[[list[int]], str],
    ) -> None:
        self._cfg = cfg
        self._rows = rows
        self._encode = encode
        self._funcs = funcs
        self._policy = policy
        self._decode = decode

    def after_step(self, step: int, server: ServerLink, log: RunLog) -> None:
        """Evaluate the served version and log the figures, when step `step` (0: before the
        first) is due one and `log` writes: under torchrun rank 0 alone evaluates (RunLog)."""
        if self.due(step) and log.writes:
            log.eval(step, self.run(server, step))

    def due(self, step: int) -> bool:
        """Whether step `step` (0: before the first) ends with an evaluation."""
        return bool(self._rows) and self._cfg.eval_steps > 0 and step % self._cfg.eval_steps == 0

    def run(self, server: ServerLink, step: int) -> dict[str, float]:
        """`eval/*` figures of the version `server` serves after step `step`."""
        rewards, components, exact, lengths, clipped = [], {}, [], [], []
        batch_size = self._cfg.prompts_per_step
        for start in range(0, len(self._rows), batch_size):
            rows_P = self._rows[start : start + batch_size]
            prompt_ids_P = [self._encode.prompt(row) for row in rows_P]
            completions_P_G = [
                r.completions for r in server.rollout(self._request(prompt_ids_P, start, server.adapter)).results
            ]
            server.sleep()  # the learner's scoring passes take the GPU
            text_ids_P_G = [[self._encode.strip_eos(c.token_ids) for c in group] for group in completions_P_G]
            rewards_P_G, components_P_G = reward_funcs.score(
                self._funcs,
                self._policy,
                prompt_ids_P,
                completions_P_G,
                text_ids_P_G,
                self._encode.answers(rows_P),
                rows_P,
                self._decode,
                self._cfg,
                pad_id=self._encode.pad_id,
                step=step,
                global_step=step,  # after step `step`: its update is done
            )
            rewards.append(rewards_P_G.flatten())
            for name, values_P_G in components_P_G.items():
                components.setdefault(name, []).append(values_P_G.flatten())
            if self._cfg.mode == "supervised":
                exact.append(exact_match_P_G(rows_P, text_ids_P_G, self._decode).flatten())
            lengths += [len(c.token_ids) for group in completions_P_G for c in group]
            clipped += [c.finish_reason == "length" for group in completions_P_G for c in group]
        return eval_metrics(
            torch.cat(rewards), {k: torch.cat(v) for k, v in components.items()}, exact, lengths, clipped
        )

    def _request(self, prompt_ids_P: list[list[int]], first_row: int, adapter: str | None) -> RolloutRequest:
        # SamplingConfig's fields are RolloutRequest's, by name (as in PromptEncoder.rollout_request)
        params = self._cfg.sampling.model_dump(exclude={"seed"}, exclude_none=True)
        greedy = self._cfg.eval_sampling == "greedy"
        if greedy:
            params.update(n=1, temperature=0.0, top_p=1.0, top_k=-1)
        seed = None if greedy else EVAL_SEED + first_row * params["n"]
        return RolloutRequest(prompt_token_ids=prompt_ids_P, adapter=adapter, seed=seed, kind="evaluation", **params)


def exact_match_P_G(rows_P: list[Row], text_ids_P_G: list[list[list[int]]], decode: Callable) -> Tensor:
    """1.0 where a completion's text, stripped of surrounding whitespace, is its row's answer."""
    return torch.tensor(
        [
            [float(decode(ids).strip() == row.answer.strip()) for ids in group]
            for row, group in zip(rows_P, text_ids_P_G, strict=True)
        ]
    )


def eval_metrics(
    rewards_N: Tensor,
    components_N: dict[str, Tensor],
    exact_N: list[Tensor],
    lengths_N: list[int],
    clipped_N: list[bool],
) -> dict[str, float]:
    """The evaluation's figures, means over every held-out completion (NaN-aware per function);
    RunLog.eval writes them as `eval/<name>`."""
    reward_mean, reward_std = nan_mean_std(rewards_N)  # unscorable completions (NaN) left out
    metrics = {
        "reward_mean": reward_mean,
        "reward_std": reward_std,
        "completions": float(rewards_N.numel()),
        "completion_len": sum(lengths_N) / len(lengths_N),
        "clipped_ratio": sum(clipped_N) / len(clipped_N),
    }
    for name, values_N in components_N.items():
        metrics[f"rewards/{name}/mean"] = nan_mean_std(values_N)[0]
    if exact_N:
        metrics["exact_match"] = torch.cat(exact_N).mean().item()
    return metrics
