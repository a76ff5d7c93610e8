"""Real peft LoRA adapters of the tiny model, with large random weights so greedy outputs move."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(model_dir: Path | str, out_dir: Path, *, seed: int, rank: int = 8, scale: float = 4.0) -> Path:
    """Save a rank-`rank` LoRA whose A and B are seeded Gaussians times `scale` (never zero)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL_LINEAR))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale / param.shape[-1] ** 0.5)
    peft_model.save_pretrained(str(out_dir))
    return out_dir
