"""The rollout server: a FastAPI service over one in-process vLLM engine."""
