"""The policy: a base model (4-bit NF4 on CUDA, full precision on CPU) with a trainable LoRA.

The KL reference is the same object with its adapter disabled, or with the init adapter's weights
as a second, frozen adapter active (learner.reference), so no second copy of the base is held.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from learner.distributed import Distributed
from learner.lora_linear import fuse_lora_layers
from learner.reference import POLICY, hold_init_reference
from shared.config import LearnerConfig
from shared.device import check_gpu_usable
from shared.durable import fsync_dir, fsync_tree
from shared.errors import ConfigError


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


def eos_token_ids(generation_config: GenerationConfig, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every token id vLLM stops on: the tokenizer's EOS and each of the generation config's
    (Qwen2.5-Instruct has two, Llama-3.1-Instruct three)."""
    ids = generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return frozenset(i for i in [tokenizer.eos_token_id, *ids] if i is not None)


def load_policy(model_dir: str, cfg: LearnerConfig) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The base model with a LoRA, fresh (seeded) or with `cfg.init_adapter`'s weights (then also held
    as the frozen KL reference, unless `cfg.reference` is base), and its tokenizer."""
    check_gpu_usable(torch.cuda.is_available(), torch.__version__, torch.version.cuda)  # no silent CPU run
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if torch.cuda.is_available():
        # The current device: under torchrun, this rank's GPU (Distributed.init sets it).
        kwargs: dict = {"dtype": torch.bfloat16, "device_map": {"": torch.cuda.current_device()}}
        if loads_in_4bit(cfg):
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
    # Gemma-2's attention soft-capping exists only in transformers' eager attention (sdpa drops it;
    # vLLM applies it): measured 5.5e-4 mean / 4.5e-3 max nats of learner-vs-vLLM gap with sdpa.
    if AutoConfig.from_pretrained(model_dir).to_dict().get("attn_logit_softcapping") is not None:
        kwargs["attn_implementation"] = "eager"
    base = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if loads_in_4bit(cfg):
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
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
    policy = get_peft_model(base, lora)
    if cfg.fused_lora:
        fuse_lora_layers(policy)
    if cfg.init_adapter is not None:
        load_adapter_weights(policy, cfg.init_adapter)
        hold_init_reference(policy, cfg)
    return policy, tokenizer


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def load_adapter_weights(policy: PeftModel, adapter_dir: Path) -> None:
    """Copy the weights of the peft adapter saved in `adapter_dir` into `policy`'s LoRA.

    Raises ConfigError naming `adapter_dir` unless the adapter has exactly the policy's LoRA
    tensors with their shapes (rank, target modules) and the same lora_alpha (the scaling, which
    no tensor shape shows).
    """
    weights, config = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / "adapter_config.json"
    if not weights.is_file() or not config.is_file():
        raise ConfigError(f"{adapter_dir}: not a peft adapter directory (needs {ADAPTER_WEIGHTS} and {config.name})")
    loaded = load_file(str(weights))
    wanted = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(policy).items()}
    got = {name: tuple(t.shape) for name, t in loaded.items()}
    lora = policy.peft_config["default"]
    mismatched = sorted(n for n in got.keys() | wanted.keys() if got.get(n) != wanted.get(n))
    if mismatched:
        name = mismatched[0]
        raise ConfigError(
            f"{adapter_dir}: the adapter's tensors do not match the LoRA config (lora.r={lora.r}, "
            f"lora.target_modules={sorted(lora.target_modules)}): {len(mismatched)} differ, e.g. {name} is "
            f"{got.get(name, 'absent')} in the adapter and {wanted.get(name, 'absent')} in the policy"
        )
    alpha = json.loads(config.read_text()).get("lora_alpha")
    if alpha != lora.lora_alpha:
        raise ConfigError(f"{adapter_dir}: the adapter's lora_alpha is {alpha}, the LoRA config's {lora.lora_alpha}")
    set_peft_model_state_dict(policy, loaded)


def loads_in_4bit(cfg: LearnerConfig) -> bool:
    """Whether `load_policy` quantizes the base: bitsandbytes 4-bit is a CUDA path."""
    return cfg.load_in_4bit and torch.cuda.is_available()


def server_dtype() -> str:
    """The dtype the learner computes in, for a local server to sample in: vLLM-CPU's "auto" would
    downcast a float32 model to bfloat16 (measured: 1.2e-3 to 1.2e-2 nats mean sampler gap)."""
    return "bfloat16" if torch.cuda.is_available() else "float32"


def adapter_serving() -> str:
    """How a local server serves the learner's one adapter: merged into its weights on CPU, where
    vLLM's LoRA path sampled 2.4x slower than the base on a 25M Qwen2 (merged: 0.98x, for a swap
    of 0.08 s there, merged in place by the engine; bench/swap.py); as a LoRA on CUDA, whose LoRA
    kernels are fast (merged serving's in-place swap is unmeasured there: no vLLM on the GPU
    machines)."""
    return "lora" if torch.cuda.is_available() else "merged"


def served_base(policy: PeftModel, model_dir: str, cfg: LearnerConfig, out_dir: Path) -> str:
    """The model directory the rollout server should load: the learner's dequantized weights when its
    base is 4-bit (export_served_base, into `out_dir`), else the model directory."""
    if not loads_in_4bit(cfg):
        return model_dir
    return str(export_served_base(policy, model_dir, out_dir))


SERVED_BASE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def export_served_base(policy: PeftModel, model_dir: str, out_dir: Path) -> Path:
    """Write the base the learner computes with, as a bf16 Hugging Face model directory vLLM can serve.

    With a 4-bit base, bitsandbytes dequantizes each NF4 weight to bf16 inside every matmul, so
    the learner's base is dequantize(quantize(W)), not W. A server sampling from the original W
    would put the whole quantization gap into the importance weights from step 1, and the KL
    reference would not be the policy that sampled. Serving these weights instead makes sampler
    and learner the same function up to kernel rounding. Written atomically; a directory already
    there is reused only if it was exported from the same model files (its SOURCE_FILE records
    their path, size and time), else replaced.
    """
    source = _source_of(model_dir)
    if (out_dir / SOURCE_FILE).is_file() and json.loads((out_dir / SOURCE_FILE).read_text()) == source:
        return out_dir
    from safetensors.torch import save_file

    base = policy.get_base_model()
    tensors = {}
    for module_name, module in base.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if "lora_" in module_name:
                continue
            # peft wraps each targeted Linear: its frozen weight sits at <module>.base_layer.weight
            key = f"{module_name}.{param_name}".removeprefix(".").replace(".base_layer.", ".")
            tensors[key] = _dequantized(param).to(torch.bfloat16).contiguous().cpu()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = base.config.to_dict()
        config.pop("quantization_config", None)
        config["torch_dtype"] = config["dtype"] = "bfloat16"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        base.generation_config.save_pretrained(tmp)
        for name in SERVED_BASE_FILES:
            if (Path(model_dir) / name).is_file():
                shutil.copy(Path(model_dir) / name, tmp / name)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1))
        if out_dir.exists():  # another model's (or an unfinished) export: replaced, never mixed
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


SOURCE_FILE = "served-base-source.json"


def _source_of(model_dir: str) -> dict:
    """What identifies the model an export was made from: its directory and each file's size and
    modification time (reading gigabytes of weights to hash them would cost more than exporting)."""
    root = Path(model_dir).resolve()
    files = sorted(p for p in root.iterdir() if p.is_file())
    return {"model": str(root), "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


def _dequantized(param: torch.nn.Parameter) -> torch.Tensor:
    """The weight a bitsandbytes 4-bit layer multiplies by; any other parameter as it is."""
    if param.device.type != "cuda":
        return param.detach()
    import bitsandbytes as bnb

    if isinstance(param, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(param.data, param.quant_state)
    return param.detach()


def next_version(adapter_root: Path) -> int:
    """One past the highest `v{N:06d}` directory already under `adapter_root` (1 if none)."""
    return max(versions(adapter_root), default=0) + 1


def versions(adapter_root: Path) -> dict[int, Path]:
    """The adapter version directories `v{N:06d}` under `adapter_root`, by N."""
    if not adapter_root.is_dir():
        return {}
    found = ((version_number(p.name), p) for p in adapter_root.iterdir())
    return {n: p for n, p in found if n is not None and p.is_dir()}


def version_number(name: str) -> int | None:
    """N of an adapter version's directory name `v{N:06d}`; None for any other name."""
    match = _VERSION_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


_VERSION_NAME = re.compile(r"v(\d+)")


def version_dir(adapter_root: Path, version: int) -> Path:
    """Where version `version` of the adapter is saved: `adapter_root/v{version:06d}`."""
    return adapter_root / f"v{version:06d}"


def save_next_version(model: PeftModel, adapter_root: Path, ranks: Distributed = Distributed()) -> tuple[int, Path]:
    """Save the adapter as the next version under `adapter_root` (save_adapter); under torchrun
    rank 0 alone writes it, and every rank gets rank 0's number and the directory it writes (not
    yet on disk on the other ranks: their caller meets rank 0 at a barrier before reading it)."""
    (version,) = ranks.main_ints([next_version(adapter_root)])
    adapter_dir = save_adapter(model, adapter_root, version) if ranks.is_main else version_dir(adapter_root, version)
    return version, adapter_dir


def save_adapter(model: PeftModel, adapter_root: Path, version: int) -> Path:
    """Write the adapter to `adapter_root/v{version:06d}` atomically: a temp dir, then a rename.

    The server is told about a version only after the rename, so it never reads a half-written
    adapter; a crash leaves at most a stray temp dir and every earlier version intact.
    """
    adapter_root.mkdir(parents=True, exist_ok=True)
    final = version_dir(adapter_root, version)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=adapter_root))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=[POLICY])  # not the reference
        fsync_tree(tmp)  # the files on disk before the name a server loads (shared.durable)
        os.rename(tmp, final)  # atomic; fails rather than overwrite an existing version
        fsync_dir(adapter_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
