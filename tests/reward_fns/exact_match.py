"""A reward function written for TRL's GRPOTrainer, as a TRL user would write it; the learner
loads this file unchanged (tests/test_reward_funcs.py)."""


def exact_match(prompts, completions, completion_ids, **kwargs):
    """1.0 where the completion is the row's `answer`, else 0.0; None (does not apply) where the row
    has no answer, and for every completion when the data has no answer column."""
    answers = kwargs.get("answer")
    if answers is None:
        return [None] * len(completions)
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [None if a is None else float(t.strip() == a.strip()) for t, a in zip(texts, answers, strict=True)]
