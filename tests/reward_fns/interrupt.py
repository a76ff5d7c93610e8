"""Importing this file is a Ctrl-C (tests/test_learner_cli.py: what the learner says when interrupted)."""

raise KeyboardInterrupt


def never(prompts, completions, completion_ids, **kwargs):
    return [0.0] * len(prompts)
