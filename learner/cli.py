"""`grpo-learner`: GRPO-train a LoRA adapter against a rollout server."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import ValidationError

from learner.data import load_data
from shared.cli import add_model_flags, deep_merge, given_overrides, model_dir_problem
from shared.config import LearnerConfig
from shared.errors import ConfigError, GrpoError

if TYPE_CHECKING:
    from learner.distributed import Distributed  # imports torch: not before a config error

log = logging.getLogger("learner")

DESCRIPTION = """\
GRPO with a LoRA adapter against a vLLM rollout server.

Each step: take a batch of prompts, wake the server, ask it for K completions per prompt, put it
to sleep, score every completion without gradients, normalize rewards within each prompt's group,
take one KL-penalized clipped policy-gradient step on the LoRA weights, save the adapter
(atomically, as a new version), wake the server and hot-load that version, then check the server
serves it.

Modes: unsupervised (rows {"text": ...} or {"prompt": ...}; reward = minus the mean NLL of the
completion tokens; an empty completion gets its group's worst reward minus
--empty-completion-margin) and supervised (rows {"prompt", "answer"}; --reward answer_perplexity
| completion_cross_entropy; rewards in [0, 1]). A prompt is a text or a list of chat messages
({"role", "content"}, through the model's chat template). --data reads .jsonl, .json, .parquet
and .arrow files and datasets save_to_disk directories (offline); --prompt-key / --answer-key
rename the columns, and other columns are kept for reward functions. --eval-data or
--eval-fraction holds rows out of training.

--reward-funcs A B ... replaces the mode's reward with the weighted sum (--reward-weights) of
built-ins (completion_log_likelihood, the unsupervised reward; answer_perplexity and
completion_cross_entropy, supervised) and Python functions written for TRL's GRPOTrainer,
given as package.module:function or path/to/file.py:function: fn(prompts, completions,
completion_ids, **columns) -> one float, or None where it does not apply, per completion.

The base model loads in 4-bit NF4 (bitsandbytes) on CUDA; bitsandbytes 4-bit is a CUDA path,
so on CPU the base stays in float32. With no --server-url, a local rollout server is started as
a child process on a free 127.0.0.1 port and stopped on exit. With no --model, the bundled tiny
model is built (seeded, warmed up on an addition task) into runs/tiny-model.

Every --save-steps steps a checkpoint (adapter, optimizer, RNG states, data position) goes to
<output_dir>/checkpoints/step-N; --resume auto continues a killed run from the newest one, and
ends with the weights an uninterrupted run would have (given --sampling-seed). A resume may change
the steps, checkpointing, reporting, paths, server connection and memory settings; other settings,
data or model than the checkpoint's run's are refused with the list of them, before any model
loads (--allow-config-change goes on with them, the new learning rate included).

With --init-adapter, the KL penalty pulls towards that adapter (--reference init), not the base.

Under `torchrun --nproc_per_node=N -m learner.cli ...` (gloo on CPU, NCCL on CUDA) each rank
samples and scores its share of every step's prompts (--prompts-per-step must divide by N) from
the servers of --server-url (required: start them first), and the update is the whole step's;
rank 0 alone saves, publishes and evaluates adapter versions and writes metrics, samples and
checkpoints. The servers are not put to sleep then.

Settings come from the LearnerConfig defaults, then --config FILE.yaml, then flags.
"""


def parse_config(argv: list[str] | None) -> LearnerConfig:
    """Defaults, then the YAML file, then the flags the user passed."""
    return parse_args(argv)[0]


def parse_args(argv: list[str] | None) -> tuple[LearnerConfig, Path | None]:
    """The run's settings (defaults, then the YAML file, then the flags the user passed), and the
    --prepare-server directory (None: train)."""
    parser = argparse.ArgumentParser(
        prog="grpo-learner", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="YAML file with any subset of the settings below")
    parser.add_argument(
        "--prepare-server",
        type=Path,
        metavar="DIR",
        help=(
            "write what a rollout server for this run loads, then exit without training: the base it "
            "serves (DIR/served-base when the learner's base loads in 4-bit) and its flags "
            "(DIR/server.args: the dtype and adapter serving of this device, --max-lora-rank, and "
            "--max-model-len = max_prompt_tokens + sampling.max_tokens rounded up to 256, at most the "
            "model's own). Start it with `grpo-rollout-server @DIR/server.args --host ...` on a machine "
            "that sees DIR; docker compose does (its prepare service)"
        ),
    )
    add_model_flags(parser, LearnerConfig)
    args = parser.parse_args(argv)
    from_file = {}
    if args.config is not None:
        try:
            from_file = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{args.config}: cannot read the config ({e})") from e
        if not isinstance(from_file, dict):
            raise ConfigError(f"{args.config}: expected a mapping of settings, got {type(from_file).__name__}")
    try:
        cfg = LearnerConfig.model_validate(deep_merge(from_file, given_overrides(args, LearnerConfig)))
    except ValidationError as e:
        where = f" in {args.config} or the flags" if args.config else ""
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid settings{where}: {problems}") from e
    return cfg, args.prepare_server


def main(argv: list[str] | None = None) -> None:
    """Validate config and data, then train; errors of ours exit 2 with one clear line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress bar
    cfg = None
    try:
        cfg, prepare_dir = parse_args(argv)
        if prepare_dir is None:
            train(cfg)
        else:
            prepare_server(cfg, prepare_dir)
    except GrpoError as e:
        print(f"grpo-learner: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ngrpo-learner: {interrupted(cfg, sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
        sys.exit(130)


def interrupted(cfg: LearnerConfig | None, argv: list[str]) -> str:
    """What a Ctrl-C left: the last step done, the newest checkpoint, and the command that resumes."""
    if cfg is None:
        return "interrupted"
    from learner import checkpoint
    from learner.run_log import last_step

    done = last_step(cfg.output_dir / "metrics.jsonl")
    newest = checkpoint.latest(cfg.output_dir / "checkpoints")
    what = f"interrupted during step {done + 1} (steps 1-{done} done)" if done else "interrupted before step 1 ended"
    if newest is None:
        return f"{what}; no checkpoint yet (one every --save-steps {cfg.save_steps} steps): nothing to resume"
    resume = [arg for i, arg in enumerate(argv) if arg != "--resume" and (i == 0 or argv[i - 1] != "--resume")]
    command = shlex.join(["grpo-learner", *resume, "--resume", "auto"])
    return f"{what}; newest checkpoint {newest}; resume with:\n  {command}"


def train(cfg: LearnerConfig) -> Path | None:
    """Run `cfg`; returns the last adapter directory. Under torchrun every rank runs it (loop.run
    says what each does)."""
    data = load_data(cfg)  # bad data stops here, before any model is loaded
    log.info("%d %s rows from %s, %d held out", len(data.train), cfg.mode, cfg.data, len(data.eval))
    from learner import reward_funcs
    from learner.distributed import Distributed

    # So do unknown or broken reward functions, and ones whose arguments are not the data's columns.
    reward_funcs.check_columns(reward_funcs.load(cfg), data.train, cfg)
    if cfg.sampling.top_p < 1 or cfg.sampling.top_k != -1:
        log.warning(
            "top_p/top_k truncate the sampler's distribution; the learner's logprobs are not truncated, "
            "so the importance ratios (and the sampler gap) are biased"
        )
    ranks = Distributed.from_env()  # torchrun's ranks, or this process alone
    ranks.check_divides(cfg.prompts_per_step)  # and a batch that does not split over them
    if ranks.world_size > 1:
        cfg = _under_torchrun(cfg, ranks)
    model_dir = _model_dir(cfg)

    from learner import checkpoint, loop, run_identity, trackers
    from learner.local_server import local_rollout_server, server_flags
    from learner.model import load_policy, loads_in_4bit, served_base, with_model_sampling_defaults
    from learner.rollout_client import RolloutClient
    from learner.serving import local_server_settings

    cfg = with_model_sampling_defaults(cfg, model_dir)
    # A bad --resume, or an earlier run's outputs a fresh start would mix with, stop here (before
    # config.yaml is rewritten: it tells whether they are this run's).
    checkpoint.check_one_run(cfg)
    # So does a resume whose checkpoint's run had other settings, data or model (run_identity).
    identity = run_identity.checked(cfg, data, model_dir)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        # The resolved settings, for reproducing the run; the API key stays out of the file.
        (cfg.output_dir / checkpoint.CONFIG_FILE).write_text(
            yaml.safe_dump(checkpoint.run_settings(cfg), sort_keys=False)
        )
        (cfg.output_dir / checkpoint.IDENTITY_FILE).write_text(json.dumps(identity, indent=1))
    trackers.check_installed(cfg.report_to)  # a tracker that is not installed, too
    # Joined before the model loads: under NCCL the rank's GPU becomes the current device.
    with ranks, ExitStack() as stack:
        policy, tokenizer = load_policy(model_dir, cfg)
        urls = cfg.server_url
        if urls is None:
            server_log = cfg.output_dir / "server.log"
            # A 4-bit learner has the server sample from its own (dequantized) weights: see served_base.
            served = served_base(policy, model_dir, cfg, cfg.output_dir / "served-base")
            log.info("starting a local rollout server for %s (log: %s)", served, server_log)
            base_params = sum(p.numel() for p in policy.parameters() if not p.requires_grad)  # not the LoRA
            settings = server_flags(local_server_settings(cfg, model_dir, base_params))
            urls = [
                stack.enter_context(
                    local_rollout_server(
                        served,
                        cfg.output_dir / "adapters",
                        log_path=server_log,
                        extra_args=settings,
                        startup_timeout_s=cfg.server_start_timeout_s,
                    )
                )
            ]
        elif loads_in_4bit(cfg):
            log.warning(
                "the learner's base is 4-bit and %s samples from the weights it loaded: unless it serves the "
                "learner's dequantized base (learner.model.export_served_base), the sampler gap and the "
                "importance weights carry the whole quantization error",
                ", ".join(urls),
            )
        # Each rank lists the replicas from its own one on: ties of the least-busy choice go to the
        # first listed, so ranks that each send one prompt at a time do not all pick the same one.
        urls = urls[ranks.rank % len(urls) :] + urls[: ranks.rank % len(urls)]
        api_key = cfg.api_key or os.environ.get("ROLLOUT_API_KEY")
        clients = [RolloutClient(url, api_key=api_key) for url in urls]
        for client in clients:
            stack.callback(client.close)
        last = loop.run(cfg, data.train, policy, tokenizer, clients, eval_rows=data.eval, ranks=ranks)
    log.info("done: last adapter %s; metrics in %s", last, cfg.output_dir / "metrics.jsonl")
    return last


def prepare_server(cfg: LearnerConfig, out_dir: Path) -> Path:
    """--prepare-server: check the data, load the model as `train` would, and write the base and
    flags of this run's rollout server into `out_dir` (learner.serving.prepare_server)."""
    data = load_data(cfg)  # bad data stops here too, before a server is prepared for it
    log.info("%d %s rows from %s", len(data.train) + len(data.eval), cfg.mode, cfg.data)
    from learner import serving
    from learner.model import load_policy, with_model_sampling_defaults

    model_dir = _model_dir(cfg)
    cfg = with_model_sampling_defaults(cfg, model_dir)
    policy, _ = load_policy(model_dir, cfg)
    args_file = serving.prepare_server(cfg, policy, model_dir, out_dir)
    log.info("rollout server prepared: grpo-rollout-server @%s %s", args_file, " ".join(args_file.read_text().split()))
    return args_file


def _under_torchrun(cfg: LearnerConfig, ranks: Distributed) -> LearnerConfig:
    """`cfg` for one of several ranks: ConfigError without server URLs, and no server sleeps."""
    if cfg.server_url is None:
        raise ConfigError(
            f"under torchrun ({ranks.world_size} ranks) pass --server-url: without it every rank would start "
            "a local rollout server of its own, and only rank 0's would get the new adapter versions; start "
            "the rollout server(s) first and give every rank the same URLs"
        )
    if cfg.sleep_server:
        log.info("under torchrun the rollout servers are not put to sleep (see --sleep-server)")
    return cfg.model_copy(update={"sleep_server": False})


def _model_dir(cfg: LearnerConfig) -> str:
    """--model, checked before anything loads it, or the bundled tiny model (built once)."""
    if cfg.model is None:
        return _default_model()
    if (problem := model_dir_problem(cfg.model)) is not None:
        raise ConfigError(problem)
    return cfg.model


def _default_model() -> str:
    from learner.tiny_model import build_tiny_model, is_built

    out = Path("runs/tiny-model")
    if is_built(out, seed=0, warmup="addition"):
        log.info("no --model: the bundled tiny model, built earlier in %s", out)
    else:
        log.info("no --model: building the bundled tiny model into %s (once, about a minute)", out)
    return str(build_tiny_model(out, seed=0, warmup="addition"))


if __name__ == "__main__":
    main()
