"""Data parallelism under `torchrun`: which rank this process is, its share of a step's prompts,
and sums over the ranks.

Every rank holds the whole policy; only the LoRA gradients and a step's figures cross ranks
(learner.update sums them once per step). Without torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK) the process is the only rank, and nothing here touches torch.distributed: every sum is
its argument, every gather its argument.

Collectives are matched by order, not by name: every rank must call the same ones in the same
order, whatever its shard held, or the ranks wait on each other forever.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Self, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from shared.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """This process's place among the ranks; the default is the only rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    """Rank on this machine: the CUDA device this rank computes on."""

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.world_size, f"rank {self.rank} outside world_size {self.world_size}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Distributed:
        """The ranks torchrun describes in `environ`; the only rank when it sets no WORLD_SIZE."""
        if "WORLD_SIZE" not in environ:
            return cls()
        return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes adapters, metrics and checkpoints."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where collectives run: this rank's GPU under NCCL, the CPU under gloo."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def init(self) -> None:
        """Join the process group (torchrun's MASTER_ADDR/MASTER_PORT): NCCL on this rank's GPU,
        which becomes the current CUDA device, or gloo on CPU. Nothing when alone."""
        if self.world_size == 1:
            return
        if torch.cuda.is_available():
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", rank=self.rank, world_size=self.world_size, device_id=self.device)
        else:
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size)

    def close(self) -> None:
        """Leave the process group (when `init` joined one)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Self:
        self.init()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_divides(self, prompts_per_step: int) -> None:
        """Raise ConfigError unless every rank gets the same whole number of a step's prompts."""
        if prompts_per_step % self.world_size:
            raise ConfigError(
                f"prompts_per_step={prompts_per_step} does not split over {self.world_size} ranks (torchrun's "
                f"WORLD_SIZE): each rank takes the same number of whole prompts; give a multiple of {self.world_size}"
            )

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of a step's prompts (or anything per prompt): rank r of W
        takes the r-th of W equal slices, so the ranks' shards in rank order are `items` in order,
        and each prompt's group of completions stays on one rank. ConfigError (see check_divides)
        when W does not divide len(items)."""
        self.check_divides(len(items))
        size = len(items) // self.world_size
        return list(items[self.rank * size : (self.rank + 1) * size])

    def sum(self, values: Tensor) -> Tensor:
        """Elementwise sum over the ranks, on `values`' device (`values` itself when alone)."""
        if self.world_size == 1:
            return values
        summed = values.detach().to(self.device, copy=True)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.to(values.device)

    def sum_ints(self, values: list[int]) -> list[int]:
        """Each of `values` summed over the ranks (one collective)."""
        if self.world_size == 1:
            return values
        return self.sum(torch.tensor(values, dtype=torch.int64)).tolist()

    def sum_floats(self, values: list[float]) -> list[float]:
        """Each of `values` summed over the ranks in float64 (one collective); NaN on any rank
        gives NaN."""
        if self.world_size == 1:
            return values
        return self.sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def main_ints(self, values: list[int]) -> list[int]:
        """Rank 0's `values`, on every rank (one collective; every rank passes as many): a number
        only rank 0 can know, such as the version of the adapter it alone writes."""
        if self.world_size == 1:
            return values
        sent = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.broadcast(sent, src=0)
        return sent.tolist()

    def gather(self, values_M: Tensor) -> Tensor:
        """The 1-D `values_M` of every rank, concatenated in rank order (lengths may differ), on
        `values_M`' device (`values_M` itself when alone)."""
        if self.world_size == 1:
            return values_M
        assert values_M.dim() == 1, f"gather takes 1-D tensors, got {tuple(values_M.shape)}"
        local_M = values_M.detach().to(self.device)
        sizes_W = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        sizes_W[self.rank] = local_M.numel()
        dist.all_reduce(sizes_W, op=dist.ReduceOp.SUM)
        sizes = sizes_W.tolist()
        # all_gather moves equal shapes: pad every rank's piece to the longest.
        padded = torch.zeros(max(sizes), dtype=local_M.dtype, device=self.device)
        padded[: local_M.numel()] = local_M
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(pieces, padded)
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes, strict=True)]).to(values_M.device)

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. rank 0's adapter is on disk before any rank reads it)."""
        if self.world_size > 1:
            dist.barrier()
