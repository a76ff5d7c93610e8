"""The KL reference the loss pulls the policy towards: the base model, or the initial adapter.

`base` is the policy with its LoRA disabled, so no second copy of the base is held. `init` (the
default when the run starts from --init-adapter, as in TRL) is that adapter's weights, held as a
second peft adapter, REFERENCE, beside the trainable one: with the base as reference, beta would
pull a fine-tuned adapter back to the base from step 1. The reference adapter is frozen (the
optimizer takes only parameters that require grad), and only the policy's adapter is saved
(model.save_adapter and checkpoint.save name it), so served versions and checkpoints are as
without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from shared.config import LearnerConfig

POLICY = "default"
"""peft's name for the adapter get_peft_model creates: the one trained, saved and served."""
REFERENCE = "reference"
"""The frozen adapter holding the init adapter's weights (reference `init`)."""


def is_init(cfg: LearnerConfig) -> bool:
    """Whether the reference is the init adapter: `cfg.reference`, or by default whether there is one."""
    return (cfg.reference or ("base" if cfg.init_adapter is None else "init")) == "init"


def hold_init_reference(policy: PeftModel, cfg: LearnerConfig) -> None:
    """With reference `init`, copy `policy`'s LoRA weights (the init adapter's: call it right after
    loading them) into a frozen REFERENCE adapter of the same LoRA config; else nothing.

    The copy takes the policy's own config rather than the init adapter's adapter_config.json
    (peft's load_adapter would): load_adapter_weights checked the tensors and lora_alpha only, and
    a setting it does not check (use_rslora's scaling) would make the reference another function
    than the policy it starts as.
    """
    if not is_init(cfg):
        return
    policy.add_adapter(REFERENCE, dataclasses.replace(policy.peft_config[POLICY], inference_mode=True))
    set_peft_model_state_dict(policy, get_peft_model_state_dict(policy, adapter_name=POLICY), adapter_name=REFERENCE)


@contextmanager
def reference_weights(policy: PeftModel) -> Iterator[None]:
    """Within: `policy` computes the reference's log-probabilities (the REFERENCE adapter active, or
    without one the LoRA disabled). After: the policy's adapter again, trainable."""
    if REFERENCE not in policy.peft_config:
        with policy.disable_adapter():
            yield
        return
    policy.set_adapter(REFERENCE, inference_mode=True)  # every adapter frozen meanwhile
    try:
        yield
    finally:
        # set_adapter makes the active adapter's weights require grad and the others' not.
        policy.set_adapter(POLICY)
