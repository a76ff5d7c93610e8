"""How long vLLM's processes spin on their message queues once idle.

vLLM's engine core and its worker exchange every step through a shared-memory `MessageQueue`; a
reader that finds it empty spins on `sched_yield()` for `SpinCondition.busy_loop_s` (1 s in vLLM
0.32) after its last message before it blocks on a socket. On a GPU host the spinning core is
spare; when the learner shares the CPUs (always on CPU, often on a 24 GB one-GPU box) that second
of a full core is taken from the learner right after every rollout, and its first computation
(reward scoring) ran 1.0 s instead of 0.06 s on the tiny model. The server shortens it
(ServerConfig.engine_idle_spin_s, 50 ms) but never to 0: a reader that never spins lost
wake-ups between back-to-back messages, each found only by vLLM's 5 s recheck.

The value must be set in the processes vLLM spawns: the server passes it in the environment and
`rollout_server.cli`, which multiprocessing imports in every spawned child, calls
`limit_idle_spin` there.

Since the CPU server runs the model inside the engine core (engine.VllmEngine: no worker process,
so no queue between them), this acts only where vLLM keeps a separate worker: on CPU with
VLLM_ENABLE_V1_MULTIPROCESSING=1, and with tensor parallelism.
"""

from __future__ import annotations

import functools
import logging
import os

IDLE_SPIN_VAR = "GRPO_ENGINE_IDLE_SPIN_S"

log = logging.getLogger(__name__)


def limit_idle_spin(busy_loop_s: float) -> bool:
    """Make every vLLM message-queue reader created from now on in this process spin at most
    `busy_loop_s` after its last message (then block until notified). False where this vLLM has
    no such reader (nothing is changed)."""
    try:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError:
        return False
    original = getattr(SpinCondition.__init__, "__wrapped__", SpinCondition.__init__)
    if original.__code__.co_varnames[1:5] != ("is_reader", "context", "notify_address", "busy_loop_s"):
        log.warning(
            "vLLM's SpinCondition has a signature this server does not know: its idle spinning is left as it is"
        )
        return False

    @functools.wraps(original)
    def __init__(self, is_reader, context, notify_address, *_, **__):
        original(self, is_reader, context, notify_address, busy_loop_s=busy_loop_s)

    SpinCondition.__init__ = __init__
    return True


def limit_idle_spin_from_env() -> None:
    """`limit_idle_spin` with the value the server put in the environment, if any."""
    value = os.environ.get(IDLE_SPIN_VAR)
    if value is not None:
        limit_idle_spin(float(value))
