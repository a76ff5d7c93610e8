"""The math of merged adapter serving (ServerConfig.adapter_serving='merged'): a peft LoRA folded
into the base weights, W' = W + scaling * B @ A for each module it targets.

Pure functions of tensors, names and the adapter's config; `adapters.write_merged` reads the files
and writes the merged checkpoint (merged_swap='rewrite'), `inplace_merge` merges into the weights
inside the engine (merged_swap='inplace'), where vLLM stacks some projections into one weight.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch

from shared.errors import AdapterLoadError

# `base_model.model.<module>.lora_A.weight`, the name peft saves (an adapter name may follow lora_A).
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def lora_scaling(adapter_config: dict) -> float:
    """The factor peft scales B @ A by: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.

    AdapterLoadError for the LoRA variants a plain W + scaling * B @ A would get wrong: DoRA,
    fan_in_fan_out (Conv1D layers store W transposed), per-module rank or alpha patterns.
    A key peft's config lacks has peft's default (older peft versions write fewer keys).
    """
    for key in ("use_dora", "fan_in_fan_out"):
        if adapter_config.get(key):
            raise AdapterLoadError(f"adapter_config.json sets {key}: merged serving merges plain LoRA only")
    for key in ("rank_pattern", "alpha_pattern"):
        if adapter_config.get(key):
            raise AdapterLoadError(f"adapter_config.json sets a {key}: merged serving takes one r and lora_alpha")
    rank, alpha = adapter_config["r"], adapter_config.get("lora_alpha", 8)  # peft's default lora_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterLoadError(f"adapter_config.json: lora_alpha={alpha!r} is not a finite number")
    return alpha / math.sqrt(rank) if adapter_config.get("use_rslora", False) else alpha / rank


def lora_pairs(adapter_keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Checkpoint weight name -> (lora_A key, lora_B key), for every module the adapter targets:
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` changes
    `model.layers.0.self_attn.q_proj.weight`.

    AdapterLoadError for any other tensor (embedding LoRA, DoRA magnitudes, biases,
    modules_to_save: nothing a W + B @ A merge applies) and for an A without its B or the reverse.
    """
    halves: dict[str, dict[str, str]] = {}
    for key in adapter_keys:
        match = _PEFT_KEY.match(key)
        if match is None:
            raise AdapterLoadError(f"tensor {key}: merged serving applies only lora_A / lora_B weights")
        halves.setdefault(f"{match['module']}.weight", {})[match["ab"]] = key
    for name, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterLoadError(f"{name}: the adapter holds lora_{''.join(pair)} without its other half")
    return {name: (pair["A"], pair["B"]) for name, pair in sorted(halves.items())}


def merged_weights(
    base_tensors: dict[str, torch.Tensor], adapter_tensors: dict[str, torch.Tensor], adapter_config: dict
) -> dict[str, torch.Tensor]:
    """W + scaling * B @ A for each weight the adapter targets, keyed by checkpoint name, in W's dtype.

    `base_tensors` holds (at least) every targeted weight, from the pristine base: a merge never
    starts from an earlier merge. The sum is computed in float32 (float64 for a float64 W) and
    rounded to W's dtype once, so a bfloat16 base gets the delta rounded as peft's own merge does.
    """
    scaling = lora_scaling(adapter_config)
    merged = {}
    for name, (a_key, b_key) in lora_pairs(adapter_tensors).items():
        if name not in base_tensors:
            raise AdapterLoadError(f"the adapter targets {name}, which the base checkpoint does not hold")
        w_O_I, a_R_I, b_O_R = base_tensors[name], adapter_tensors[a_key], adapter_tensors[b_key]
        check_lora_shapes(name, w_O_I.shape, a_R_I.shape, b_O_R.shape)
        merged[name] = _plus_delta(w_O_I, a_R_I, b_O_R, scaling)
    return merged


def check_lora_shapes(name: str, w_shape: Sequence[int], a_shape: Sequence[int], b_shape: Sequence[int]) -> None:
    """AdapterLoadError unless lora_B [O, R] @ lora_A [R, I] adds to the weight `name` of shape [O, I]."""
    if len(a_shape) != 2 or len(b_shape) != 2 or tuple(w_shape) != (b_shape[0], a_shape[1]):
        raise AdapterLoadError(
            f"{name}: lora_B {list(b_shape)} @ lora_A {list(a_shape)} cannot add to the base's "
            f"{list(w_shape)} (adapter trained on another base model?)"
        )
    if a_shape[0] != b_shape[1]:
        raise AdapterLoadError(f"{name}: lora_A has rank {a_shape[0]}, lora_B rank {b_shape[1]}")


def stacked_layout(names: Iterable[str], packed_modules: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """vLLM module -> the checkpoint weights stacked in its weight, in order, for the modules that
    hold the weights `names`.

    `packed_modules` is the model class's `packed_modules_mapping`: with {"qkv_proj": ["q_proj",
    "k_proj", "v_proj"]}, `model.layers.0.self_attn.k_proj.weight` is rows of the weight of
    `model.layers.0.self_attn.qkv_proj`, after q_proj's and before v_proj's, and the whole stack is
    listed (it is repacked whole). A projection no module packs is a module of its own.
    """
    shard_of = {shard: packed for packed, shards in packed_modules.items() for shard in shards}
    layout = {}
    for name in names:
        parent, _, leaf = name.removesuffix(".weight").rpartition(".")
        prefix = f"{parent}." if parent else ""
        if leaf in shard_of:
            layout[prefix + shard_of[leaf]] = [f"{prefix}{shard}.weight" for shard in packed_modules[shard_of[leaf]]]
        else:
            layout[prefix + leaf] = [name]
    return layout


def merged_stacked(
    base_O_I: torch.Tensor,
    shard_rows: Sequence[int],
    loras: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    scaling: float,
) -> torch.Tensor:
    """A stacked weight (shards of `shard_rows` rows each, one after the other) with the LoRA
    (lora_A [R, I], lora_B [O_i, R]) of each shard i in `loras` merged into that shard's rows,
    bit for bit as `merged_weights` merges it alone; the other shards' rows are the base's. A new
    tensor in the base's dtype; `base_O_I` is not modified.
    """
    assert base_O_I.ndim == 2 and base_O_I.shape[0] == sum(shard_rows), (base_O_I.shape, shard_rows)
    merged_O_I = torch.empty_like(base_O_I)
    start = 0
    for i, rows in enumerate(shard_rows):
        w_S_I, out_S_I = base_O_I[start : start + rows], merged_O_I[start : start + rows]
        if i in loras:
            _plus_delta(w_S_I, *loras[i], scaling, out=out_S_I)
        else:
            out_S_I.copy_(w_S_I)
        start += rows
    return merged_O_I


def _plus_delta(
    w_O_I: torch.Tensor, a_R_I: torch.Tensor, b_O_R: torch.Tensor, scaling: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """W + scaling * B @ A, computed in float32 (float64 for a float64 W) and rounded to W's dtype
    once, so a bfloat16 base gets the delta rounded as peft's own merge does; into `out` if given."""
    compute = torch.promote_types(w_O_I.dtype, torch.float32)
    if w_O_I.dtype == compute:  # no rounding to do: written straight into `out`, one pass
        return torch.addmm(w_O_I, b_O_R.to(compute), a_R_I.to(compute), alpha=scaling, out=out)
    merged = torch.addmm(w_O_I.to(compute), b_O_R.to(compute), a_R_I.to(compute), alpha=scaling).to(w_O_I.dtype)
    return merged if out is None else out.copy_(merged)
