"""Reward functions that probe how the learner calls them, or misbehave on purpose
(tests/test_reward_funcs.py loads them by file path)."""

import asyncio

NOT_CALLABLE = 3


def record(prompts, completions, completion_ids, **columns):
    """0.0 each; keeps what it was called with in `record.seen`."""
    record.seen = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
    return [0.0] * len(prompts)


def length_or_none(prompts, completions, completion_ids, **kwargs):
    """The completion's length in characters; None for an empty one."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(len(t)) if t else None for t in texts]


_STARTED: dict[asyncio.AbstractEventLoop, int] = {}  # per event loop: meeting functions started


async def _meet() -> None:
    """Return once both meeting functions have started in this event loop; raise if the other
    never starts (they were awaited one after the other). Bounded: 5 s."""
    loop = asyncio.get_running_loop()
    _STARTED[loop] = _STARTED.get(loop, 0) + 1
    for _ in range(500):
        if _STARTED[loop] >= 2:
            return
        await asyncio.sleep(0.01)
    raise RuntimeError("the other async reward function never started")


async def meet_two(prompts, completions, completion_ids, **kwargs):
    await _meet()
    return [2.0] * len(prompts)


async def meet_three(prompts, completions, completion_ids, **kwargs):
    await _meet()
    return [3] * len(prompts)


def raises(prompts, completions, completion_ids, **kwargs):
    raise ValueError("the judge is down")


async def raises_async(prompts, completions, completion_ids, **kwargs):
    await asyncio.sleep(0)
    raise ValueError("the async judge is down")


def one_short(prompts, completions, completion_ids, **kwargs):
    return [1.0] * (len(prompts) - 1)


def a_tuple_of_strings(prompts, completions, completion_ids, **kwargs):
    return tuple("1.0" for _ in prompts)


def a_number(prompts, completions, completion_ids, **kwargs):
    return 1.0


def infinite(prompts, completions, completion_ids, **kwargs):
    return [float("inf")] * len(prompts)


def accuracy_reward(completions, solution, **kwargs):
    """TRL's signature: `solution` is a column of the dataset."""
    return [float(c == s) for c, s in zip(completions, solution, strict=True)]
