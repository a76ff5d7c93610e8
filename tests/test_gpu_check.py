"""bench/gpu_check.py, the script a lent GPU machine runs, kept working by its --cpu mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def test_the_gpu_check_runs_on_cpu_and_writes_a_loadable_served_base(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["device"] == "cpu"
    for row in ("(a) learner vs served base (bf16 forward)", "(c) learner vs served (dequantized) base"):
        mean_gap = float(table[row].split("mean ")[1].split(",")[0])
        assert mean_gap < 0.05, (row, table[row])  # float32 learner vs a bf16 forward: rounding only
    assert any(name.startswith("(b) second update: 32 x") for name in table)  # the preset's 4 x 8 sequences
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "served-base", dtype=torch.float32)
    assert served.config.tie_word_embeddings and served.config.vocab_size == 1024
