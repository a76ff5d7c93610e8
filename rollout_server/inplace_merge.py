"""Merged serving's in-place swap (ServerConfig.merged_swap='inplace'), run by vLLM's worker, in
the process that holds the model: the adapter's files are read, merged into the base weights of
the modules it targets (`merge.merged_stacked`) and the result replaces the served weights; no
checkpoint is written or read back.

Each merge starts from the base weights, never from the weights served: vLLM's CPU linear layers
pack their weight for oneDNN at load and keep no dense copy of it (`layer.weight` is left empty),
so the served weights cannot be read back, and subtracting the previous version's delta from them
would drift anyway. The worker keeps, instead, a copy of the base weight of every module an
adapter targeted (read once from the base checkpoint, in its dtype): the memory of those weights
once more, and a merge bit for bit that of `merged_weights` (the rewrite path) whatever came
before it.

The worker class gets these methods through `engine_args`' worker_extension_cls; the service
calls `merge_adapter` through AsyncLLM.collective_rpc, with no request running.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rollout_server.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from rollout_server.merge import check_lora_shapes, lora_pairs, lora_scaling, merged_stacked, stacked_layout


class _Base(NamedTuple):
    """A module's weight as the base checkpoint holds it, its shards stacked as vLLM stacks them."""

    weight_O_I: torch.Tensor
    shard_rows: list[int]


class InPlaceMergeExtension:
    """Mixed into vLLM's worker class (vLLM checks that no name clashes with the worker's own)."""

    _merge_bases: dict[str, _Base] | None = None
    """vLLM module name -> its base weight, for every module an adapter targeted so far."""
    _merged_modules: frozenset[str] = frozenset()
    """Modules whose served weight is not the base's (an adapter is merged into them)."""

    @torch.no_grad()
    def merge_adapter(self, base_dir: str, adapter_dir: str | None) -> dict[str, float]:
        """Serve the base weights (the safetensors checkpoint in `base_dir`) with the peft LoRA in
        `adapter_dir` merged in, or the base's own with None; {"modules": modules rewritten,
        "seconds": time taken}.

        Everything that can fail (a module the model lacks, shapes of another base) is checked
        before the first weight changes. No request may be running.
        """
        start = time.perf_counter()
        model = self.model_runner.get_model()  # type: ignore[attr-defined] (the worker's)
        if self._merge_bases is None:
            self._merge_bases = {}
        loras, scaling = {}, 0.0
        if adapter_dir is not None:
            scaling = lora_scaling(json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()))
            tensors = load_file(Path(adapter_dir) / ADAPTER_WEIGHTS)
            loras = {name: (tensors[a], tensors[b]) for name, (a, b) in lora_pairs(tensors).items()}
        layout = stacked_layout(loras, model.packed_modules_mapping)
        layers = {name: _linear(model, name) for name in layout.keys() | self._merged_modules}
        self._read_bases(Path(base_dir), {name: layout[name] for name in layout if name not in self._merge_bases})
        plans = {}
        for name, shards in layout.items():
            base, layer = self._merge_bases[name], layers[name]
            served = (layer.output_size, layer.input_size)
            if tuple(base.weight_O_I.shape) != served:
                raise ValueError(
                    f"{name}: the base checkpoint stacks to {list(base.weight_O_I.shape)}, vLLM serves {list(served)}"
                )
            plans[name] = {}
            for i, (shard, rows) in enumerate(zip(shards, base.shard_rows, strict=True)):
                if shard in loras:
                    a_R_I, b_O_R = loras[shard]
                    check_lora_shapes(shard, (rows, base.weight_O_I.shape[1]), a_R_I.shape, b_O_R.shape)
                    plans[name][i] = loras[shard]
        for name, layer in layers.items():
            base = self._merge_bases[name]
            if name in plans:
                _install(layer, merged_stacked(base.weight_O_I, base.shard_rows, plans[name], scaling))
            else:  # merged by the previous adapter, not by this one (a copy: vLLM may keep what it gets)
                _install(layer, base.weight_O_I.clone())
        self._merged_modules = frozenset(plans)
        return {"modules": len(layers), "seconds": time.perf_counter() - start}

    def _read_bases(self, base_dir: Path, wanted: dict[str, list[str]]) -> None:
        """Read the base weights of the modules in `wanted` (module -> its stacked checkpoint weights)."""
        if not wanted:
            return
        needed = {shard for shards in wanted.values() for shard in shards}
        found = {}
        for path in sorted(base_dir.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                found |= {name: f.get_tensor(name) for name in needed.intersection(f.keys())}
        assert self._merge_bases is not None
        for name, shards in wanted.items():
            if missing := [shard for shard in shards if shard not in found]:
                raise ValueError(f"{name}: the base checkpoint in {base_dir} holds no {missing[0]}")
            parts = [found[shard] for shard in shards]
            self._merge_bases[name] = _Base(torch.cat(parts), [part.shape[0] for part in parts])


def _linear(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The served model's unquantized linear layer `name`; ValueError for anything else."""
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"the served model has no module {name} (its names differ from the checkpoint's): serve it with "
            "--merged-swap rewrite"
        ) from None
    if not isinstance(layer, LinearBase) or not isinstance(layer.quant_method, UnquantizedLinearMethod):
        raise ValueError(
            f"{name} is no unquantized linear layer in the served model: serve it with --merged-swap rewrite"
        )
    if layer.tp_size != 1:  # each rank would need its slice of the merge
        raise ValueError(
            f"{name} is split over {layer.tp_size} tensor-parallel ranks: serve it with --merged-swap rewrite"
        )
    return layer


def _install(layer: torch.nn.Module, weight_O_I: torch.Tensor) -> None:
    """Make `weight_O_I` (a full weight, in the checkpoint's dtype) the weight `layer` serves."""
    from vllm.platforms import current_platform

    dtype = layer.weight.dtype  # the served dtype (the weight itself may be gone: below)
    if current_platform.is_cpu():
        # vLLM's CPU linear copies its weight into a packed kernel (oneDNN's, or sgl's and
        # zentorch's on other CPUs) and empties layer.weight: pack the new one the same way, as
        # vLLM's own in-place reload does.
        layer.weight = torch.nn.Parameter(weight_O_I.to(dtype), requires_grad=False)
        layer.quant_method.process_weights_after_loading(layer)
    else:
        # A dense weight that CUDA graphs read by address: write into it. (Not run here: the GPU
        # machines have no vLLM; CPU is where the learner serves merged.)
        layer.weight.copy_(weight_O_I)
