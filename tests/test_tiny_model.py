"""The bundled tiny model: deterministic build, tokenizer contract, addition task, vLLM loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.tiny_model import (
    ADDITION_OPERAND_LIMIT,
    ATTEMPT_END,
    DEFAULT_WARMUP_STEPS,
    MANIFEST,
    MANIFEST_FORMAT,
    addition_rows,
    addition_split,
    build_tiny_model,
    is_built,
)
from shared.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- build -------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()
    # The tokenizer does not depend on the model seed.
    assert (other / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def test_a_matching_build_is_reused_and_force_rebuilds(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "m", seed=3)
    weights = out / "model.safetensors"
    os.utime(weights, (0, 0))  # a rebuild would write a fresh mtime
    assert is_built(out, seed=3)
    assert not is_built(out, seed=4)
    assert not is_built(out, seed=3, warmup="addition")

    build_tiny_model(out, seed=3)
    assert weights.stat().st_mtime == 0

    build_tiny_model(out, seed=3, force=True)
    assert weights.stat().st_mtime > 0
    assert json.loads((out / MANIFEST).read_text())["args"]["seed"] == 3
    assert not list(tmp_path.glob(".m.tmp-*"))  # no temporary directory left behind


def test_a_different_build_replaces_ours_but_a_foreign_directory_is_refused(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "m", seed=3)
    build_tiny_model(out, seed=4)
    assert is_built(out, seed=4)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="does not hold a tiny model"):
        build_tiny_model(foreign, seed=0)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_invalid_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="warmup must be one of"):
        build_tiny_model(tmp_path / "m", warmup="subtraction")
    with pytest.raises(ConfigError, match="warmup_steps must be > 0"):
        build_tiny_model(tmp_path / "m", warmup="addition", warmup_steps=0)
    assert not (tmp_path / "m").exists()


# --- tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "The quiet river ran slowly.",  # corpus words: whole tokens
        "12+7=19",  # arithmetic
        "  two  spaces\nand a newline\t",  # whitespace survives byte-level encoding
        "café ☃ 東京",  # bytes outside the corpus still round-trip
    ],
)
def test_tokenizer_round_trips_text(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_tokenizer_splits_every_digit(tokenizer) -> None:
    assert tokenizer.tokenize("12+7=19") == ["1", "2", "+", "7", "=", "1", "9"]
    assert tokenizer.tokenize("1234567890") == list("1234567890")
    # Space is its own token before a number ("Ġ" is byte-level's space), never merged with a digit.
    assert tokenizer.tokenize("x 42") == ["x", "Ġ", "4", "2"]


def test_tokenizer_vocab_and_special_tokens(tokenizer) -> None:
    assert 1000 <= len(tokenizer) <= 4096
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1, special
    # No BOS or EOS is added implicitly: the prompt the learner sees is the prompt vLLM sees.
    assert tokenizer.encode("3+4=") == tokenizer.encode("3+4=", add_special_tokens=False)
    # Common corpus words are single tokens.
    assert tokenizer.tokenize("The garden") == ["The", "Ġgarden"]


def test_tokenizer_applies_the_chat_template(tokenizer) -> None:
    messages = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n"
    )


# --- model -------------------------------------------------------------------------------------


def test_model_loads_with_transformers_and_has_the_tiny_shape(tiny_model_dir: Path, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (128, 256, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads) == (2, 2, 64)
    assert cfg.max_position_embeddings == 512
    assert cfg.tie_word_embeddings is False
    assert cfg.vocab_size == len(tokenizer)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert json.loads((tiny_model_dir / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id

    ids_B_T = tokenizer(["12+7="], return_tensors="pt").input_ids
    with torch.no_grad():
        logits_B_T_V = model(ids_B_T).logits
    assert logits_B_T_V.shape == (1, 5, len(tokenizer))


# --- addition task -----------------------------------------------------------------------------


def test_addition_split_is_disjoint_complete_and_closed_under_swap() -> None:
    train, heldout = addition_split()
    assert not set(train) & set(heldout)
    assert len(train) + len(heldout) == ADDITION_OPERAND_LIMIT**2
    assert all((b, a) in set(heldout) for a, b in heldout)
    assert 0.1 < len(heldout) / ADDITION_OPERAND_LIMIT**2 < 0.3
    assert addition_split() == (train, heldout)


def test_addition_rows_are_deterministic_correct_and_from_their_split() -> None:
    train, heldout = addition_split()
    rows = addition_rows(5, 100)
    assert rows == addition_rows(5, 100)
    assert rows != addition_rows(6, 100)
    assert len({r["prompt"] for r in rows}) == 100  # drawn without replacement
    for row in rows:
        a, b = map(int, row["prompt"].removesuffix("=").split("+"))
        assert row["answer"] == str(a + b)
        assert (a, b) in set(train)
    held = addition_rows(0, len(heldout), split="heldout")
    assert {r["prompt"] for r in held} == {f"{a}+{b}=" for a, b in heldout}


def test_addition_rows_refuse_bad_arguments() -> None:
    train, _ = addition_split()
    with pytest.raises(ValueError, match="count must be in"):
        addition_rows(0, len(train) + 1)
    with pytest.raises(ValueError, match="split must be"):
        addition_rows(0, 1, split="test")


def test_example_files_follow_the_split() -> None:
    train, heldout = addition_split()
    supervised = [json.loads(line) for line in (EXAMPLES / "supervised.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (EXAMPLES / "heldout_addition.jsonl").read_text().splitlines()]
    texts = [json.loads(line) for line in (EXAMPLES / "unsupervised.jsonl").read_text().splitlines()]
    assert supervised == addition_rows(0, len(supervised), split="train")
    assert held == addition_rows(0, len(held), split="heldout")
    assert len(texts) >= 16 and all(set(row) == {"text"} and row["text"] for row in texts)


def test_warmup_gives_the_format_and_partial_accuracy(warm_model_dir: Path) -> None:
    manifest = json.loads((warm_model_dir / MANIFEST).read_text())
    assert manifest["args"] == {
        "format": MANIFEST_FORMAT,
        "seed": 0,
        "warmup": "addition",
        "warmup_steps": DEFAULT_WARMUP_STEPS,
    }
    heldout = manifest["heldout"]
    # Room on both sides: GRPO must be able to improve it, and the format must already be there.
    assert 0.1 <= heldout["exact_match"] <= 0.6
    assert 0.2 <= heldout["mean_answer_prob"] <= 0.8
    assert heldout["mean_end_prob"] > 0.9

    # Recount exact match independently with transformers' generate on every held-out row.
    model = AutoModelForCausalLM.from_pretrained(warm_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(warm_model_dir)
    _, pairs = addition_split()
    correct = 0
    for a, b in pairs:
        ids_1_T = tok(f"{a}+{b}=", return_tensors="pt").input_ids
        # The model's generation config stops at '=' (kept in the output): generate needs the tokenizer.
        out_1_T = model.generate(ids_1_T, max_new_tokens=4, do_sample=False, tokenizer=tok)
        expected = tok.encode(str(a + b) + ATTEMPT_END)
        correct += out_1_T[0, ids_1_T.shape[1] :].tolist()[: len(expected)] == expected
    # generate uses a KV cache, so a near-tie may flip; a handful of rows at most.
    assert abs(correct / len(pairs) - heldout["exact_match"]) <= 0.01


# --- vLLM --------------------------------------------------------------------------------------

_VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams

llm = LLM(model=sys.argv[1], max_model_len=256, enable_lora=True, max_lora_rank=8, seed=0)
params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
outputs = llm.generate(json.loads(sys.argv[2]), params, use_tqdm=False)
print("RESULT " + json.dumps([[o.prompt_token_ids, list(o.outputs[0].token_ids)] for o in outputs]))
"""


@pytest.mark.integration
def test_vllm_loads_the_model_and_greedy_matches_transformers(tiny_model_dir: Path, tokenizer) -> None:
    prompts = ["12+7=", "The quiet river"]
    # vLLM's engine core starts in a spawned process, so it runs in a child interpreter of its own.
    proc = subprocess.run(
        [sys.executable, "-c", _VLLM_SCRIPT, str(tiny_model_dir), json.dumps(prompts)],
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result_line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    results = json.loads(result_line.removeprefix("RESULT "))

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for prompt, (vllm_prompt_ids, vllm_completion_ids) in zip(prompts, results, strict=True):
        ids_1_T = tokenizer(prompt, return_tensors="pt").input_ids
        assert vllm_prompt_ids == ids_1_T[0].tolist()
        # Random weights still have top-1/top-2 logit gaps above 4e-3 on these prompts, far
        # beyond float32 noise, so the two greedy decodes must agree token for token.
        # A plain argmax loop rather than generate(), which would stop at eos or mask it.
        with torch.no_grad():
            for _ in range(8):
                next_1 = model(ids_1_T).logits[:, -1].argmax(-1)
                ids_1_T = torch.cat([ids_1_T, next_1[:, None]], dim=1)
        assert vllm_completion_ids == ids_1_T[0, len(vllm_prompt_ids) :].tolist()
