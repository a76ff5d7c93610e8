"""The base written for the server (the learner's own weights, bf16) loads as a complete model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.model import export_served_base, load_policy
from shared.config import LearnerConfig


def test_exported_base_holds_every_base_weight_in_bf16(tiny_model_dir: Path, tmp_path: Path) -> None:
    policy, _ = load_policy(str(tiny_model_dir), LearnerConfig())
    out = export_served_base(policy, str(tiny_model_dir), tmp_path / "served-base")
    served, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    theirs = dict(served.named_parameters())
    ours = {n: p for n, p in policy.get_base_model().named_parameters() if "lora_" not in n}
    for name, param in ours.items():
        # peft wraps each targeted Linear: its weight lives at <module>.base_layer.weight
        torch.testing.assert_close(theirs[name.replace(".base_layer", "")], param.detach().bfloat16().float())
    assert (
        AutoTokenizer.from_pretrained(out)("12+7=").input_ids
        == AutoTokenizer.from_pretrained(tiny_model_dir)("12+7=").input_ids
    )
    assert export_served_base(policy, str(tiny_model_dir), out) == out  # reused, not rewritten


def test_an_export_of_another_model_is_replaced_not_reused(
    tiny_model_dir: Path, warm_model_dir: Path, tmp_path: Path
) -> None:
    """A run directory (or compose's served volume) reused with another --model must not serve the
    first model's weights."""
    out = tmp_path / "served-base"
    export_served_base(load_policy(str(tiny_model_dir), LearnerConfig())[0], str(tiny_model_dir), out)
    first = (out / "model.safetensors").read_bytes()
    warm, _ = load_policy(str(warm_model_dir), LearnerConfig())
    assert export_served_base(warm, str(warm_model_dir), out) == out
    assert (out / "model.safetensors").read_bytes() != first
    served = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = warm.get_base_model().get_input_embeddings().weight.detach().bfloat16().float()
    torch.testing.assert_close(served.get_input_embeddings().weight, ours)
