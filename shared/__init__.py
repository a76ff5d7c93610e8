"""Types shared by the rollout server and the learner: wire schemas, config models, errors.

Depends on pydantic and the standard library only.
"""
