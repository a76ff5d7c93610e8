"""The policy: a base model (4-bit NF4 on CUDA, full precision on CPU) with a trainable LoRA.

The reference model is the same object with its adapter disabled (`model.disable_adapter()`), so
no second copy of the base is held.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from shared.config import LearnerConfig


def with_model_sampling_defaults(cfg: LearnerConfig, model_dir: str) -> LearnerConfig:
    """`cfg` with the sampling settings it leaves to the model (None) read from the model directory.

    `stop` comes from `stop_strings` in generation_config.json: a model fine-tuned to end its
    answers somewhere says so there (the bundled tiny model's attempt ends at '='); absent, none.
    """
    if cfg.sampling.stop is not None:
        return cfg
    path = Path(model_dir) / "generation_config.json"
    stop_strings = json.loads(path.read_text()).get("stop_strings") if path.is_file() else None
    stop = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    return cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"stop": stop})})


def load_policy(model_dir: str, cfg: LearnerConfig) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The base model with a fresh LoRA (seeded), and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if torch.cuda.is_available():
        kwargs: dict = {"dtype": torch.bfloat16, "device_map": {"": 0}}
        if cfg.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
    else:
        # bitsandbytes 4-bit is a CUDA path; on CPU the base stays in float32.
        kwargs = {"dtype": torch.float32}
    base = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if torch.cuda.is_available() and cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    base.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    lora = PeftLoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora), tokenizer


def next_version(adapter_root: Path) -> int:
    """One past the highest `v{N:06d}` directory already under `adapter_root` (1 if none)."""
    done = [int(p.name[1:]) for p in adapter_root.glob("v[0-9]*") if p.name[1:].isdigit()]
    return max(done, default=0) + 1


def save_adapter(model: PeftModel, adapter_root: Path, version: int) -> Path:
    """Write the adapter to `adapter_root/v{version:06d}` atomically: a temp dir, then a rename.

    The server is told about a version only after the rename, so it never reads a half-written
    adapter; a crash leaves at most a stray temp dir and every earlier version intact.
    """
    adapter_root.mkdir(parents=True, exist_ok=True)
    final = adapter_root / f"v{version:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=adapter_root))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        os.rename(tmp, final)  # atomic; fails rather than overwrite an existing version
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
