"""lm-evaluation-harness's `local-completions` against the real server (real vLLM on CPU, the tiny
model, an API key): a generate_until task and a multiple-choice (loglikelihood) task, written here
on local JSONL, for the base model and for the adapter version it serves. Loglikelihood tasks
failed before: `body.echo: Extra inputs are not permitted` (they score a continuation with echo,
logprobs=1 and token-id prompts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from tests.conftest import KeyedServer

pytestmark = pytest.mark.integration

ROWS = [json.loads(line) for line in Path("examples/heldout_addition.jsonl").read_text().splitlines()[:8]]

MC_TASK = """
task: tiny_addition_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""

GEN_TASK = """
task: tiny_addition_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["="]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two tasks: each row's sum, and 3 choices for it (the right answer first, then two wrong)."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    mc = [
        {
            "prompt": r["prompt"],
            "choices": [r["answer"], str(int(r["answer"]) + 1), str(int(r["answer"]) + 10)],
            "label": 0,
        }
        for r in ROWS
    ]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (folder / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "mc.yaml").write_text(MC_TASK.format(data=folder / "mc.jsonl"))
    (folder / "gen.yaml").write_text(GEN_TASK.format(data=folder / "gen.jsonl"))
    return folder


def lm_eval(server: KeyedServer, model: str, tasks: Path, tokenizer: Path, out: Path) -> dict:
    """Run the lm_eval CLI on both tasks against `model` on the server; its results and samples."""
    args = [
        f"model={model}",
        f"base_url={server.url}/v1/completions",
        f"tokenizer={tokenizer}",
        "tokenizer_backend=huggingface",
        "num_concurrent=1",
        "max_retries=1",
    ]
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", ",".join(args)]
    cmd += ["--tasks", "tiny_addition_mc,tiny_addition_gen", "--include_path", str(tasks)]
    cmd += ["--output_path", str(out), "--log_samples"]
    env = {**os.environ, "OPENAI_API_KEY": server.key, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    (results,) = out.rglob("results_*.json")
    samples = {
        task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        for task in ("tiny_addition_mc", "tiny_addition_gen")
    }
    return {"results": json.loads(results.read_text())["results"], "samples": samples}


@pytest.mark.parametrize("adapter", [False, True])
def test_lm_eval_runs_generate_until_and_loglikelihood_tasks(
    keyed_server: KeyedServer, tasks: Path, tiny_model_dir: Path, tmp_path: Path, adapter: bool
) -> None:
    pytest.importorskip("lm_eval", reason="lm_eval is in the dev group")
    model = "policy" if adapter else tiny_model_dir.name
    run = lm_eval(keyed_server, model, tasks, tiny_model_dir, tmp_path)
    mc, gen = run["results"]["tiny_addition_mc"], run["results"]["tiny_addition_gen"]
    assert 0 <= mc["acc,none"] <= 1 and 0 <= gen["exact_match,none"] <= 1
    # Every choice of every row was scored: a finite log-likelihood below 0.
    scored = [resp[0][0] for sample in run["samples"]["tiny_addition_mc"] for resp in sample["resps"]]
    assert len(scored) == 3 * len(ROWS) and all(-100 < float(ll) < 0 for ll in scored)
    # Each score is the server's log-probability of the choice after the prompt: the first row's
    # right answer, scored again here through /v1/completions with echo, tokenized as lm-eval does
    # (context and context + continuation encoded without special tokens).
    first = run["samples"]["tiny_addition_mc"][0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    context = tokenizer.encode(first["doc"]["prompt"], add_special_tokens=False)
    whole = tokenizer.encode(first["doc"]["prompt"] + first["doc"]["choices"][0], add_special_tokens=False)
    echo = httpx.post(
        f"{keyed_server.url}/v1/completions",
        json={"model": model, "prompt": whole, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0},
        headers=keyed_server.auth,
        timeout=120,
    )
    assert echo.status_code == 200, echo.text
    token_logprobs = echo.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert len(token_logprobs) == len(whole) and token_logprobs[0] is None
    assert sum(token_logprobs[len(context) :]) == pytest.approx(float(first["resps"][0][0][0]), abs=1e-4)
    assert len(run["samples"]["tiny_addition_gen"]) == len(ROWS)
