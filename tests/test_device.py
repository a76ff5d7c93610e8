"""A visible GPU that torch cannot use stops the learner and the server with a message, instead of
a silent run on the CPU (torch's and the driver's answers faked here; the check is stdlib)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.device import check_gpu_usable
from shared.errors import DeviceError

DRIVER = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\nGCC version: gcc 12\n"
)


@pytest.fixture
def driver(tmp_path: Path) -> Path:
    (tmp_path / "version").write_text(DRIVER)
    return tmp_path / "version"


@pytest.mark.parametrize(
    ("torch_cuda", "needle"),
    [
        (None, "torch 2.13.0+cpu (a CPU-only build) cannot use it"),  # the cpu group on a GPU machine
        ("13.0", "the driver is too old for CUDA 13.0"),  # a CUDA build the 535 driver cannot run
    ],
)
def test_a_visible_gpu_torch_cannot_use_is_named(driver: Path, torch_cuda: str | None, needle: str) -> None:
    with pytest.raises(DeviceError, match="driver 535.104.05") as refused:
        check_gpu_usable(False, "2.13.0+cpu", torch_cuda, driver_file=driver, environ={})
    assert needle in str(refused.value) and "CUDA_VISIBLE_DEVICES=''" in str(refused.value)


def test_no_gpu_a_usable_gpu_or_hidden_gpus_pass(driver: Path, tmp_path: Path) -> None:
    check_gpu_usable(False, "2.13.0+cpu", None, driver_file=tmp_path / "absent", environ={})  # a CPU machine
    check_gpu_usable(True, "2.11.0", "13.0", driver_file=driver, environ={})  # torch uses it
    check_gpu_usable(False, "2.13.0+cpu", None, driver_file=driver, environ={"CUDA_VISIBLE_DEVICES": ""})


def test_this_machine_passes() -> None:
    """As the learner and the server call it: on this CPU machine (no driver) it lets them run."""
    import torch

    check_gpu_usable(torch.cuda.is_available(), torch.__version__, torch.version.cuda)
