"""Checks an adapter directory before vLLM sees it.

A refused adapter must leave the serving one untouched, so everything that can be checked on disk
is checked here, where a failure is a clean 4xx, rather than inside the engine process.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from shared.errors import AdapterLoadError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# peft tensor names end in "<module>.lora_A.weight" / "<module>.lora_B.weight".
_LORA_KEY = re.compile(r"\.(?P<module>[a-z_]+)\.lora_(?P<ab>[AB])(?:\.[a-z_]+)?\.weight$")


def resolve_adapter_dir(adapter_root: Path, lora_path: str) -> Path:
    """The adapter directory `lora_path` names, if it lies under `adapter_root`.

    Relative paths are taken relative to the root. Symlinks are resolved before the check, so
    neither `..` nor a link can leave the root.
    """
    root = adapter_root.resolve()
    path = (root / lora_path).resolve()
    if not path.is_relative_to(root):
        raise AdapterLoadError(f"lora_path {lora_path!r} is outside the adapter root {root}")
    if not path.is_dir():
        raise AdapterLoadError(f"lora_path {lora_path!r}: no such adapter directory under {root}")
    return path


def validate_adapter_dir(path: Path, *, base_config: dict, max_rank: int) -> None:
    """Refuse adapters that are not peft safetensors LoRAs of this base with rank <= max_rank."""
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file():
        raise AdapterLoadError(f"{path}: missing {ADAPTER_CONFIG} (not a peft adapter)")
    if not weights_file.is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise AdapterLoadError(f"{path}: missing {ADAPTER_WEIGHTS}; only safetensors adapters are read (found {found})")
    try:
        adapter_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{config_file}: invalid JSON ({e})") from e
    if adapter_config.get("peft_type") != "LORA":
        raise AdapterLoadError(f"{config_file}: peft_type is {adapter_config.get('peft_type')!r}, not 'LORA'")
    rank = adapter_config.get("r")
    if not isinstance(rank, int) or not 0 < rank <= max_rank:
        raise AdapterLoadError(f"{config_file}: rank r={rank!r} exceeds the server's max_lora_rank={max_rank}")
    expected = _projection_shapes(base_config)
    for key, shape in _safetensors_shapes(weights_file).items():
        match = _LORA_KEY.search(key)
        if match is None or match["module"] not in expected:
            continue
        in_features, out_features = expected[match["module"]]
        want = [rank, in_features] if match["ab"] == "A" else [out_features, rank]
        if shape != want:
            raise AdapterLoadError(
                f"{weights_file}: tensor {key} has shape {shape}, this base needs {want} "
                "(adapter trained on another base model, or rank differs from adapter_config.json)"
            )


def _projection_shapes(base_config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear projection of a Llama/Qwen2-style block."""
    hidden = base_config["hidden_size"]
    heads = base_config["num_attention_heads"]
    head_dim = base_config.get("head_dim") or hidden // heads
    kv = base_config.get("num_key_value_heads", heads) * head_dim
    inter = base_config["intermediate_size"]
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (8-byte little-endian length, then JSON)."""
    with path.open("rb") as f:
        header = f.read(8)
        if len(header) != 8:
            raise AdapterLoadError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", header)
        if length > 100_000_000:
            raise AdapterLoadError(f"{path}: not a safetensors file (header length {length})")
        try:
            meta = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterLoadError(f"{path}: not a safetensors file ({e})") from e
    return {k: v["shape"] for k, v in meta.items() if k != "__metadata__"}
