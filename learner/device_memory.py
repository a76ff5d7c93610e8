"""The learner's CUDA memory at the hand-over to a waking server: logged, and its cache released."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("learner")

GIB = 2**30


def release_before_wake() -> None:
    """Return the learner's cached CUDA blocks to the driver before a sleeping server wakes, and log
    what the learner's phase (scoring and update, since the last wake) held at its peak.

    A server's wake_up maps back the weights and KV cache that its sleep freed; blocks torch's
    allocator keeps reserved for the learner are not free for it, and on one 24 GB GPU that
    difference decides whether the wake fits. No-op without CUDA (on CPU sleep frees nothing).
    """
    if not torch.cuda.is_available():
        return
    peak_allocated, peak_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    cached = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    kept = torch.cuda.memory_reserved()
    log.info(
        "learner phase: peak %.2f GiB allocated, %.2f GiB reserved; released %.2f GiB of cache before waking "
        "the server, %.2f GiB stays reserved (the model, the LoRA and its optimizer state)",
        peak_allocated / GIB,
        peak_reserved / GIB,
        (cached - kept) / GIB,
        kept / GIB,
    )
    torch.cuda.reset_peak_memory_stats()
