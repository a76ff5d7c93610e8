"""A GPU torch cannot use: named, instead of a silent fall back to the CPU paths.

vLLM 0.32's CUDA build needs a recent driver. Where the driver is older, or the installed torch is a
CPU build (the `cpu` dependency group on a GPU machine), `torch.cuda.is_available()` is False and
both the server and the learner quietly take their CPU paths: float32, no 4-bit, hours per step.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from shared.errors import DeviceError

NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")


def check_gpu_usable(
    cuda_available: bool,
    torch_version: str,
    torch_cuda: str | None,
    *,
    driver_file: Path = NVIDIA_DRIVER_FILE,
    environ: Mapping[str, str] = os.environ,
) -> None:
    """DeviceError when the NVIDIA driver is loaded (`driver_file` exists) but torch sees no CUDA
    device, unless CUDA_VISIBLE_DEVICES hides every GPU on purpose ("" or "-1")."""
    if cuda_available or not driver_file.is_file() or environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\S+)", driver_file.read_text())
    driver = found.group(1) if found else "of unknown version"
    build = f"built for CUDA {torch_cuda}" if torch_cuda else "a CPU-only build"
    raise DeviceError(
        f"an NVIDIA GPU is visible (driver {driver}) but torch {torch_version} ({build}) cannot use it, "
        "and this would run on the CPU: "
        + (
            "install the CUDA engine (`uv sync --no-group cpu --group gpu`, or `pip install -e . --group gpu`)"
            if torch_cuda is None
            else f"the driver is too old for CUDA {torch_cuda} (`nvidia-smi` shows the CUDA version it supports)"
        )
        + "; to run on the CPU on purpose, set CUDA_VISIBLE_DEVICES=''"
    )
