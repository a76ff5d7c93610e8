"""Reward functions: the built-ins the policy scores, and Python functions written for TRL.

`reward_funcs` in the config lists them; each entry is a built-in (`learner.scoring.Builtin`:
completion_log_likelihood in any mode, answer_perplexity and completion_cross_entropy in
supervised mode) or a Python function, `package.module:function` (importable: installed or on
PYTHONPATH) or `path/to/file.py:function`. `load` resolves them all when the learner starts,
before the model loads, so a typo costs seconds. `score` runs them every step before the update,
so a function that fails stops the run with nothing of that step applied.

A Python function is called as TRL 1.16's GRPOTrainer calls one (`_calculate_rewards`), so a
function written for TRL runs unchanged: `fn(prompts=..., completions=..., completion_ids=...,
trainer_state=..., **columns)`, each but trainer_state a list of N = P * G entries, prompt by
prompt (a prompt's G completions together), returning one finite number per completion, or None
(or NaN, as in TRL) where it does not apply: a list or tuple of Python or numpy numbers or 0-d
tensors, or a 1-d numpy array or tensor (what TRL's torch.tensor(...) takes). `async def`
functions run concurrently.
  prompts: each completion's prompt as its data row gives it: a text, or a conversation's
      messages as dicts.
  completions: the completion's text, decoded from its tokens without special tokens (TRL's
      skip_special_tokens=True: no end-of-sequence token, no chat-template markers); after a
      conversation, [{"role": "assistant", "content": text}].
  completion_ids: the sampled token ids, end-of-sequence token included (as TRL's).
  trainer_state: a transformers TrainerState, as TRL's: global_step (the updates done so far),
      max_steps (`steps`), logging_steps, eval_steps and save_steps; its other fields (epoch,
      log_history, ...) keep their defaults.
  columns: each other column of the data row (a supervised row's `answer` among them), None
      where a row lacks it. TRL's log_extra and log_metric are not passed.
The reward is the weighted sum of the functions' rewards, a None adding nothing
(`rewards.weighted_reward_sum`); each function's own rewards are kept for the logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch import Tensor
from transformers import TrainerState

from learner import scoring
from learner.prompts import Row
from learner.rewards import weighted_reward_sum
from learner.scoring import Builtin
from shared.config import LearnerConfig
from shared.errors import ConfigError, RewardFunctionError
from shared.schemas import Completion

log = logging.getLogger("learner")

BUILTIN_MODES: dict[Builtin, tuple[str, ...]] = {
    "completion_log_likelihood": ("unsupervised", "supervised"),
    "answer_perplexity": ("supervised",),  # they score the data's answers
    "completion_cross_entropy": ("supervised",),
}
ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")
"""What every Python function gets besides the columns; a column of one of these names is not passed."""


@dataclass(frozen=True)
class RewardFunc:
    """One entry of `reward_funcs`, resolved, with its weight."""

    entry: str
    """As configured: a built-in's name, 'module:function' or 'file.py:function'."""
    name: str
    """Its name in metrics and the sample log: the built-in's, or the function's as written."""
    weight: float
    builtin: Builtin | None
    """The built-in the policy scores; None for a Python function."""
    fn: Callable[..., Any] | None
    """The Python function; None for a built-in."""


def load(cfg: LearnerConfig) -> list[RewardFunc]:
    """The configured reward functions (the mode's built-in when none are), in order.

    A ConfigError names the first entry that is no built-in of this mode, cannot be imported, is
    missing from its module or file, or is not callable; and two entries of one name (their
    metrics would mix). A file is executed once per process, however often it is loaded.
    """
    entries = cfg.reward_funcs or [scoring.mode_reward(cfg)]
    weights = cfg.reward_weights or [1.0] * len(entries)
    funcs = [_resolve(entry, weight, cfg.mode) for entry, weight in zip(entries, weights, strict=True)]
    names = [f.name for f in funcs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"reward_funcs: two entries are named {name!r} (their metrics would mix)")
    return funcs


def check_columns(funcs: list[RewardFunc], rows: list[Row], cfg: LearnerConfig) -> None:
    """ConfigError naming a Python function's required argument that is neither one of ARGUMENTS nor
    a column of every row: found before any model loads, not at step 1 (TRL's functions take the
    dataset's columns by name, e.g. `accuracy_reward(completions, solution, **kwargs)`)."""
    columns = set.intersection(*({*_answer_columns(row, cfg.answer_key), *row.extra} for row in rows))
    for func in funcs:
        if func.fn is None:
            continue
        required = [
            p.name
            for p in inspect.signature(func.fn).parameters.values()
            if p.default is p.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in ARGUMENTS
        ]
        missing = [name for name in required if name not in columns]
        if missing:
            raise ConfigError(
                f"reward function {func.entry}: its required argument(s) {', '.join(map(repr, missing))} are not "
                f"columns of every row of {cfg.data} (its columns: {', '.join(sorted(columns)) or 'none'}); rename "
                "a column (--prompt-key / --answer-key, or in the data), or give the argument a default"
            )


def is_the_mode_reward(cfg: LearnerConfig) -> bool:
    """Whether the reward is exactly the mode's built-in: no reward_funcs, or it alone at weight 1."""
    return cfg.reward_funcs in (None, [scoring.mode_reward(cfg)]) and cfg.reward_weights in (None, [1.0])


def score(
    funcs: list[RewardFunc],
    policy: PeftModel,
    prompt_ids_P: list[list[int]],
    completions_P_G: list[list[Completion]],
    text_ids_P_G: list[list[list[int]]],
    answer_ids_P: list[list[int]] | None,
    rows_P: list[Row],
    decode: Callable[..., str],
    cfg: LearnerConfig,
    *,
    pad_id: int,
    step: int,
    global_step: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """rewards_P_G, the weighted sum of every function's rewards, and each function's own
    (components_P_G by name, NaN where it returned None; empty when the reward is one built-in
    at weight 1, which rewards_P_G then is).

    Built-ins are scored by `policy` (`scoring.score`, no gradients) on the text tokens
    `text_ids_P_G`; Python functions get the completions decoded by `decode` (the tokenizer's,
    called with skip_special_tokens=True) and a TrainerState at `global_step` (the updates done:
    step - 1 in training step `step`, `step` in the evaluation after it). Python functions run
    first: they fail before the policy's passes are spent. RewardFunctionError names the function
    and `step` when one raises or returns anything but one number or None per completion.
    """
    P, G = len(completions_P_G), len(completions_P_G[0])
    assert len(rows_P) == len(prompt_ids_P) == P, (len(rows_P), len(prompt_ids_P), P)
    python = [f for f in funcs if f.builtin is None]
    from_python_N = (
        _call_python(python, rows_P, completions_P_G, text_ids_P_G, decode, step, _trainer_state(cfg, global_step), cfg)
        if python
        else {}
    )
    components_P_G: dict[str, Tensor] = {}
    for f in funcs:  # in the configured order
        if f.builtin is None:
            components_P_G[f.name] = from_python_N[f.name].view(P, G)
        else:
            components_P_G[f.name] = scoring.score(
                policy, prompt_ids_P, text_ids_P_G, answer_ids_P, cfg, pad_id=pad_id, reward=f.builtin
            )
    if len(funcs) == 1 and funcs[0].builtin is not None and funcs[0].weight == 1.0:
        return components_P_G[funcs[0].name], {}
    weights_F = torch.tensor([f.weight for f in funcs], dtype=torch.float32)
    rewards_P_G_F = torch.stack([components_P_G[f.name].float() for f in funcs], dim=2)
    unscored_P_G = rewards_P_G_F.isnan().all(dim=2)
    if unscored_P_G.any():
        p, g = (int(i) for i in unscored_P_G.nonzero()[0])
        log.warning(
            "step %d: no reward function applies to %d completion(s) (all returned None): unscorable, they get "
            "no reward and advantage 0 (as in TRL); "
            "the first is completion %d of prompt %r",
            step,
            int(unscored_P_G.sum()),
            g,
            rows_P[p].prompt_text,
        )
    return weighted_reward_sum(rewards_P_G_F, weights_F), components_P_G


def _call_python(
    funcs: list[RewardFunc],
    rows_P: list[Row],
    completions_P_G: list[list[Completion]],
    text_ids_P_G: list[list[list[int]]],
    decode: Callable[..., str],
    step: int,
    trainer_state: TrainerState,
    cfg: LearnerConfig,
) -> dict[str, Tensor]:
    """rewards_N of each Python function by name, NaN where it returned None (TRL's arguments).
    A supervised row's answer is the column `answer`, and also the data's own column name when
    `cfg.answer_key` renamed it (a TRL function takes the dataset's columns by their names)."""
    G = len(completions_P_G[0])
    prompts_P = [row.prompt if isinstance(row.prompt, str) else [m.model_dump() for m in row.prompt] for row in rows_P]
    # TRL: batch_decode(completion_ids, skip_special_tokens=True); a chat model's completion ends
    # in its template's markers (<|im_end|>, <|eot_id|>), which no reward should have to strip.
    texts_P_G = [[decode(t, skip_special_tokens=True) for t in group] for group in text_ids_P_G]
    columns_P = [
        {k: v for k, v in {**_answer_columns(row, cfg.answer_key), **row.extra}.items() if k not in ARGUMENTS}
        for row in rows_P
    ]
    names = sorted({k for columns in columns_P for k in columns})
    kwargs = {
        "prompts": [prompt for prompt in prompts_P for _ in range(G)],
        "completions": [
            text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]
            for prompt, texts in zip(prompts_P, texts_P_G, strict=True)
            for text in texts
        ],
        "completion_ids": [list(c.token_ids) for group in completions_P_G for c in group],
        "trainer_state": trainer_state,
        **{k: [columns.get(k) for columns in columns_P for _ in range(G)] for k in names},
    }
    results = _call_each(funcs, kwargs)
    return {f.name: _checked(f, result, len(kwargs["prompts"]), step) for f, result in zip(funcs, results, strict=True)}


def _trainer_state(cfg: LearnerConfig, global_step: int) -> TrainerState:
    """The TrainerState TRL passes its reward functions (for schedules over the run), with the
    fields this run has: the updates done and the run's length; steps are optimizer steps."""
    return TrainerState(
        global_step=global_step,
        max_steps=cfg.steps,
        logging_steps=1,  # every step's metrics are written
        eval_steps=cfg.eval_steps,
        save_steps=cfg.save_steps,
    )


def _answer_columns(row: Row, answer_key: str | None) -> dict[str, Any]:
    columns = row.model_dump(exclude={"text", "prompt", "extra"})
    if answer_key and "answer" in columns:
        columns[answer_key] = columns["answer"]
    return columns


def _call_each(funcs: list[RewardFunc], kwargs: dict[str, Any]) -> list[Any]:
    """Each function's return value, or the exception it raised; awaitables (`async def`) are
    awaited together. Synchronous functions run outside any event loop, as in TRL, so one may run
    its own (asyncio.run)."""
    results: list[Any] = []
    for func in funcs:
        try:
            results.append(func.fn(**kwargs))
        except Exception as e:  # reported, with the function's name, once every call has ended
            results.append(e)
    waiting = [i for i, result in enumerate(results) if inspect.isawaitable(result)]
    if waiting:

        async def gather() -> list[Any]:
            return await asyncio.gather(*(results[i] for i in waiting), return_exceptions=True)

        for i, result in zip(waiting, asyncio.run(gather()), strict=True):
            results[i] = result
    return results


def _checked(func: RewardFunc, result: Any, n: int, step: int) -> Tensor:
    """rewards_N from a function's return value, NaN for None; RewardFunctionError if unusable."""

    def error(problem: str) -> RewardFunctionError:
        return RewardFunctionError(f"reward function {func.entry!r} at step {step}: {problem}")

    if isinstance(result, BaseException):
        if not isinstance(result, Exception):
            raise result  # KeyboardInterrupt, a cancelled task: not the function's answer
        frame = traceback.extract_tb(result.__traceback__)[-1]
        where = f" ({Path(frame.filename).name}:{frame.lineno})"
        raise error(f"raised {type(result).__name__}: {result}{where}") from result
    if isinstance(result, np.ndarray | Tensor):
        if result.ndim != 1:
            raise error(f"returned an array of shape {tuple(result.shape)}, not one reward per completion ({n})")
        result = list(result)  # its numbers: numpy scalars, or 0-d tensors
    if not isinstance(result, list | tuple):
        raise error(f"returned a {type(result).__name__}, not a list of {n} rewards (numbers or None)")
    if len(result) != n:
        raise error(f"returned {len(result)} rewards for {n} completions (one per completion, prompt by prompt)")
    rewards = [_number(reward) for reward in result]
    for i, (reward, given) in enumerate(zip(rewards, result, strict=True)):
        if reward is None and given is not None:
            raise error(f"returned {given!r} ({type(given).__name__}) for completion {i}: not a number or None")
        if reward is not None and math.isinf(reward):
            raise error(f"returned {reward} for completion {i}: rewards are finite numbers, or None")
    return torch.tensor([math.nan if r is None else r for r in rewards], dtype=torch.float32)


def _number(reward: Any) -> float | None:
    """A reward as a float, as TRL's torch.tensor(rewards) reads it: a Python or numpy number
    (bool included) or a 0-d tensor or array; None for None and for anything else."""
    if isinstance(reward, Tensor | np.ndarray) and reward.ndim == 0:
        reward = reward.item()
    if isinstance(reward, numbers.Real | np.bool_):
        return float(reward)
    return None


def _resolve(entry: str, weight: float, mode: str) -> RewardFunc:
    if ":" not in entry:
        if entry not in BUILTIN_MODES:
            raise ConfigError(
                f"reward_funcs: {entry!r} is no built-in reward ({', '.join(BUILTIN_MODES)}) and no "
                "'package.module:function' or 'path/to/file.py:function'"
            )
        if mode not in BUILTIN_MODES[entry]:
            raise ConfigError(f"reward_funcs: {entry!r} scores the data's answers: supervised mode only")
        return RewardFunc(entry, entry, weight, builtin=entry, fn=None)
    where, _, name = entry.rpartition(":")
    module = _import_file(Path(where), entry) if where.endswith(".py") else _import_module(where, entry)
    try:
        fn = getattr(module, name)
    except AttributeError as e:
        raise ConfigError(f"reward_funcs: {entry!r}: {where} has no {name!r}") from e
    if not callable(fn):
        raise ConfigError(f"reward_funcs: {entry!r}: {name} is a {type(fn).__name__}, not a function")
    return RewardFunc(entry, name, weight, builtin=None, fn=fn)


def _import_module(name: str, entry: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"reward_funcs: {entry!r}: no module {e.name!r} (installed, or on PYTHONPATH? a file is "
            "'path/to/file.py:function')"
        ) from e
    except Exception as e:  # the module's own code failed: the user's to fix, named here
        raise ConfigError(f"reward_funcs: {entry!r}: importing {name} raised {type(e).__name__}: {e}") from e


def _import_file(path: Path, entry: str) -> ModuleType:
    """The module of a .py file, executed once per process: registered in sys.modules under a name
    made from its resolved path (dataclasses and pickle look their module up there)."""
    if not path.is_file():
        raise ConfigError(f"reward_funcs: {entry!r}: no file {path}")
    resolved = path.resolve()
    name = f"_reward_file_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the file's own code failed: the user's to fix, named here
        del sys.modules[name]
        raise ConfigError(f"reward_funcs: {entry!r}: running {path} raised {type(e).__name__}: {e}") from e
    return module
