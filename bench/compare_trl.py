"""TRL's GRPOTrainer and grpo-learner side by side: the same models, prompts, workload and seeds, one
after the other in one run, then one markdown table. Prints figures; asserts nothing.

    make bench-compare [BENCH_ARGS="--steps 3"]     # sets up .venv (TRL is in the dev group), then runs this
    .venv/bin/python bench/compare_trl.py [--steps 10] [--runs tiny:32 25m:32 25m:256]

Workload, per optimizer step: 4 prompts of examples/unsupervised.jsonl x K=8 = 32 completions of
at most 32 new tokens (or 256: --runs SIZE:TOKENS; GRPO users sample hundreds of tokens, where
generation's share grows) at temperature 1; LoRA r=8, alpha 16, dropout 0 on every linear layer; beta
0.04; learning rate 1e-4, constant; reward = minus the mean NLL of the completion under the policy
(grpo-learner's unsupervised mode; on the TRL side a reward function doing the same forward, no
grad). Both systems take the prompts in the same order (grpo-learner's PromptSampler), use seed 0,
float32, one forward and backward pass over the 32 completions per step, and the same number of
torch threads: torch's default, which grpo-learner keeps and the TRL side sets. OMP_NUM_THREADS is
not set for them: the learner's rollout server would inherit it; at its defaults the learner gives
its local server's engine every core while it waits on it (learner.serving.local_server_settings).

Models: "tiny", the bundled Qwen2 (build_tiny_model, seed 0, no warm-up, ~0.6M parameters), and
"25m", a seeded random Qwen2 of the same family and tokenizer (hidden 512, 8 layers of 8 heads of
64 (vLLM's CPU attention needs head_dim 64), MLP 1280).

- TRL: GRPOTrainer (transformers `generate`, peft LoRA, use_vllm=False) in a process of its own,
  run by bench/trl_side.py, which times its phases (TRL 1.16 is in the project's dev group).
- grpo-learner: the console script with a config of the same settings, its other settings left
  at their defaults (it sleeps and wakes its server every step, which on CPU releases nothing); it
  starts its own rollout server. Its phases are whatever time_* keys its metrics.jsonl has, plus
  "other" (the rest of the step's wall time: logging, checkpoints).

Per run (model and completion length) and system: the median seconds per step over --steps steps after one warm-up step,
completions/s at that median, the median of each phase, the reward mean of the first steps (the
warm-up included: the reward is the same function on both sides, so the curves should lie in the
same range), and the peak resident memory (MiB) of every process (bench/peak_rss.py): the TRL
process; the learner, and its rollout server: the server's process tree together, then its API
process, vLLM's engine core and worker, and the helpers (multiprocessing's resource tracker, and
the C++ compilers torch runs when vLLM compiles the model); "all", every process of the run together.

Below the table, per run: TRL's s/step over grpo-learner's (the speed-up), and the floor of the
learner's update on this machine: the FLOPs of its passes (the reference forward, the policy forward,
the backward through the frozen base for the LoRA gradients: 2 + 2 + 2 = 6 x parameters x tokens,
the tokens being every completion's prompt and completion as metrics.jsonl counts them) at the
matmul throughput measured here (float32, the model's hidden size, the torch threads in use).

A second table, on the tiny model against a rollout server started here with the learner's local
server's settings: the server's overhead over vLLM's AsyncLLM called directly with the same
requests (4 prompts x 8 x 32 tokens from the base, the same seeds; bench/direct_rollouts.py takes
them in rotating order; the overhead is HTTP + JSON, from the client's time less the server's own,
plus the server's RolloutService against AsyncLLM on one engine; the target is < 5%), and the
hot-swap as the learner publishes (save the adapter, POST /v1/load_lora_adapter, check /v1/models serves it).

A third table: the swap merged in place (bench/swap.py, the learner's local server's settings and
engine threads) at 25M and at ~100M parameters: first load, then the median of the rest, the
engine's share, and that share's floor here (every targeted weight merged from the base copy and
packed again: two copies' memory traffic at this machine's measured copy rate).

Everything goes under --work-dir (default runs/bench-compare): the models (reused by later runs),
each run's output directory and log, and results.json with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from peak_rss import PeakRss  # bench/, this script's directory
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from learner.data import load_rows
from learner.prompts import PromptSampler
from learner.tiny_model import build_tiny_model, write_tokenizer
from shared.config import LearnerConfig

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples/unsupervised.jsonl"
RUN_TIMEOUT_S = 1200.0
"""One system on one model; a run still going then is stopped (SIGTERM, then SIGKILL)."""
STOP_GRACE_S = 30.0
REWARD_STEPS = 5
"""Reward means shown per run, from step 1."""
MIB = 2**20


@dataclass(frozen=True)
class Workload:
    """What both systems do each step, and with what settings."""

    prompts_per_step: int = 4
    n: int = 8
    max_tokens: int = 32
    temperature: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    beta: float = 0.04
    learning_rate: float = 1e-4
    seed: int = 0

    @property
    def completions(self) -> int:
        return self.prompts_per_step * self.n


@dataclass
class ProcessGroup:
    """Peak resident bytes of some processes together, and of each (kind of) process among them
    (PeakRss.peak)."""

    name: str
    peak: int
    parts: dict[str, int]


@dataclass
class RunFigures:
    """One system on one model: seconds and phases of each step after the warm-up step, reward mean
    of every step."""

    system: str
    seconds: list[float]
    phases: list[dict[str, float]]
    reward_means: list[float]
    memory: list[ProcessGroup]
    """The TRL process; or the learner and its rollout server."""
    memory_all: int
    """Peak resident bytes of every process of the run together."""
    processes: list[tuple[str, int]]
    """Every process seen: its command line and peak resident bytes."""


# --- models ---------------------------------------------------------------------------------------


def build_qwen2_25m(out: Path) -> Path:
    """A seeded random Qwen2 of ~25M parameters with the tiny model's tokenizer, built once into `out`."""
    return build_qwen2(out, hidden=512, intermediate=1280, layers=8, heads=8)


def build_qwen2(out: Path, *, hidden: int, intermediate: int, layers: int, heads: int) -> Path:
    """A seeded random Qwen2 of this shape (heads of 64: vLLM's CPU attention needs head_dim 64) with
    the tiny model's tokenizer, built once into `out` (written beside it, then renamed: a directory
    there is complete)."""
    if out.is_dir():
        return out
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_tokenizer(tmp)
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,  # as the tiny qwen2
        use_sliding_window=False,
        dtype="float32",
        **ids,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


def parameter_count(model_dir: Path, names_ending: str = "") -> int:
    """Parameters in the model's checkpoint, of the tensors whose names end with `names_ending`."""
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        names = [name for name in f.keys() if name.endswith(names_ending)]  # noqa: SIM118 - safe_open has no __iter__
        return sum(math.prod(f.get_slice(name).get_shape()) for name in names)


# --- running a system -----------------------------------------------------------------------------


def run_sampled(cmd: list[str], log_path: Path) -> PeakRss:
    """Run `cmd` (output to `log_path`), sampling its process tree's memory; SystemExit with the
    log's end if it fails or outlives RUN_TIMEOUT_S."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    peaks = PeakRss(proc.pid).start()
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the learner stops its server on the way out
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()  # its server gets SIGKILL too (a parent-death signal)
            proc.wait()
    finally:
        peaks.stop()
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{cmd[0]} exited with {proc.returncode} (log: {log_path}):\n{tail}")
    return peaks


def run_trl(
    trl_python: Path, model_dir: Path, out: Path, prompts: list[str], w: Workload, steps: int, threads: int
) -> RunFigures:
    """GRPOTrainer via bench/trl_side.py; every step's figures."""
    defaults = LearnerConfig()
    workload = {**asdict(w), "model": str(model_dir), "prompts": prompts, "steps": steps, "threads": threads}
    workload |= {
        "empty_completion_margin": defaults.empty_completion_margin,
        "empty_completion_reward": defaults.empty_completion_reward,
    }
    (out / "workload.json").write_text(json.dumps(workload, indent=1))
    cmd = [str(trl_python), "bench/trl_side.py", str(out / "workload.json"), str(out / "result.json")]
    peaks = run_sampled(cmd, out / "trl.log")
    result = json.loads((out / "result.json").read_text())
    trl = peaks.peak(peaks.subtree(peaks.root_pid))
    return RunFigures(
        system=f"TRL {result['trl_version']} GRPOTrainer",
        seconds=[s["seconds"] for s in result["steps"][1:]],
        phases=[s["phases"] for s in result["steps"][1:]],
        reward_means=[s["reward_mean"] for s in result["steps"]],
        memory=[ProcessGroup("TRL", trl, {})],
        memory_all=trl,
        processes=process_list(peaks),
    )


def run_learner(model_dir: Path, out: Path, w: Workload, steps: int) -> RunFigures:
    """grpo-learner with its own local server. A step's seconds are the time between its row of
    metrics.jsonl and the previous one, so the first (warm-up) step has none."""
    settings = {
        "mode": "unsupervised",
        "data": str(DATA),
        "model": str(model_dir),
        "output_dir": str(out / "run"),
        "steps": steps,
        "prompts_per_step": w.prompts_per_step,
        "micro_batch_size": w.completions,  # one pass over the batch, as TRL's
        "learning_rate": w.learning_rate,
        "seed": w.seed,
        "save_steps": 0,
        "sample_every": 0,
        "sampling": {"n": w.n, "max_tokens": w.max_tokens, "temperature": w.temperature, "seed": w.seed},
        "lora": {"r": w.lora_r, "alpha": w.lora_alpha, "dropout": 0.0},
        "loss": {"beta": w.beta, "aggregation": "token_mean"},
    }
    LearnerConfig.model_validate(settings)  # a setting the learner would refuse stops here
    (out / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    learner = Path(sys.executable).parent / "grpo-learner"
    peaks = run_sampled([str(learner), "--config", str(out / "config.yaml")], out / "learner.log")
    rows = [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines()]
    seconds, phases = [], []
    for previous, row in zip(rows, rows[1:], strict=False):
        step = {k.removeprefix("time_"): v for k, v in row.items() if k.startswith("time_")}
        seconds.append(row["time"] - previous["time"])
        phases.append(step | {"other": seconds[-1] - sum(step.values())})
    server = next(p for p, seen in peaks.processes.items() if "rollout_server.cli" in seen.cmdline)
    server_tree = peaks.subtree(server)
    learner_tree = [p for p in peaks.subtree(peaks.root_pid) if p not in server_tree]
    kinds: dict[str, list[int]] = {}
    for p in server_tree:
        kinds.setdefault("api" if p == server else server_process_name(peaks.processes[p].cmdline), []).append(p)
    parts = {kind: peaks.peak(kinds[kind]) for kind in sorted(kinds, key=lambda kind: kind == "helpers")}
    memory = [
        ProcessGroup("learner", peaks.peak(learner_tree), {}),
        ProcessGroup("server", peaks.peak(server_tree), parts),
    ]
    reward_means = [r["reward_mean"] for r in rows]
    memory_all = peaks.peak(learner_tree + server_tree)
    return RunFigures("grpo-learner", seconds, phases, reward_means, memory, memory_all, process_list(peaks))


def server_process_name(cmdline: str) -> str:
    """vLLM names its processes ("VLLM::EngineCore", "VLLM::Worker"); the others below the server are
    helpers: multiprocessing's resource tracker, and short-lived ones (results.json lists them)."""
    return cmdline.removeprefix("VLLM::").split(" ", 1)[0] if cmdline.startswith("VLLM::") else "helpers"


def process_list(peaks: PeakRss) -> list[tuple[str, int]]:
    return [(seen.cmdline, seen.hwm_bytes) for seen in peaks.processes.values()]


# --- the serving figures ----------------------------------------------------------------------------


def serving_figures(model_dir: Path, out: Path, w: Workload, repeats: int, pairs: int) -> dict:
    """On a server set up as the learner's local one: rollouts from the base over HTTP and directly
    (bench/direct_rollouts.py, while the server runs), then hot-swaps as the learner publishes."""
    from learner.local_server import local_rollout_server, lora_rank_slot, server_flags
    from learner.model import adapter_serving, load_policy, save_adapter, server_dtype
    from learner.prompts import PromptEncoder
    from learner.rollout_client import RolloutClient

    cfg = LearnerConfig(model=str(model_dir), lora={"r": w.lora_r, "alpha": w.lora_alpha}, seed=w.seed)
    policy, tokenizer = load_policy(str(model_dir), cfg)
    encode = PromptEncoder(tokenizer, cfg)
    prompt_ids = [encode.prompt(row) for row in load_rows(DATA, "unsupervised")[: w.prompts_per_step]]
    root = out / "adapters"
    settings = {
        "dtype": server_dtype(),
        "adapter_serving": adapter_serving(),
        "max_lora_rank": lora_rank_slot(w.lora_r),
    }
    figures: dict = {"adapter_serving": settings["adapter_serving"], "swap": []}
    with local_rollout_server(
        str(model_dir), root, log_path=out / "server.log", extra_args=server_flags(settings)
    ) as url:
        # Before any adapter: a server serving a merged adapter refuses rollouts of the base.
        request = {"url": url, "server": settings, "model": str(model_dir), "prompt_token_ids": prompt_ids}
        request |= {"n": w.n, "max_tokens": w.max_tokens, "temperature": w.temperature, "seed": w.seed}
        (out / "rollouts_request.json").write_text(json.dumps(request | {"repeats": pairs}))
        cmd = [
            sys.executable,
            "bench/direct_rollouts.py",
            str(out / "rollouts_request.json"),
            str(out / "rollouts.json"),
        ]
        run_sampled(cmd, out / "rollouts.log")
        figures["rollouts"] = json.loads((out / "rollouts.json").read_text())
        client = RolloutClient(url)
        for version in range(1, repeats + 1):
            t0 = time.perf_counter()
            adapter = save_adapter(policy, root, version)
            t1 = time.perf_counter()
            client.load_adapter("policy", adapter.name, version=version)
            t2 = time.perf_counter()
            assert client.served_version("policy") == version, "the server does not serve the version just loaded"
            figures["swap"].append({"save": t1 - t0, "load": t2 - t1, "verify": time.perf_counter() - t2})
        client.close()
    return figures


# --- tables ---------------------------------------------------------------------------------------


def training_table(runs: dict[str, list[RunFigures]], params: dict[str, int], w: Workload, steps: int) -> str:
    lines = [
        f"| model | system | s/step (median of {steps}) | completions/s | phases (median s) "
        f"| reward mean, steps 1-{min(REWARD_STEPS, steps + 1)} | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, figures in runs.items():
        size = key.split(" ", 1)[0]
        for f in figures:
            median = statistics.median(f.seconds)
            names = list(dict.fromkeys(k for p in f.phases for k in p))
            phases = ", ".join(f"{k} {statistics.median(p.get(k, 0.0) for p in f.phases):.3f}" for k in names)
            rewards = ", ".join(f"{r:.3f}" for r in f.reward_means[:REWARD_STEPS])
            memory = "; ".join(memory_text(group) for group in f.memory)
            if len(f.memory) > 1:
                memory += f"; all {f.memory_all / MIB:.0f}"
            lines.append(
                f"| {key} ({params[size] / 1e6:.2f}M) | {f.system} | {median:.3f} | {w.completions / median:.1f} "
                f"| {phases} | {rewards} | {memory} |"
            )
    return "\n".join(lines)


def memory_text(group: ProcessGroup) -> str:
    text = f"{group.name} {group.peak / MIB:.0f}"
    if group.parts:
        text += f" ({', '.join(f'{name} {peak / MIB:.0f}' for name, peak in group.parts.items())})"
    return text


def serving_table(figures: dict, w: Workload, repeats: int) -> str:
    swaps, rollouts = figures["swap"], figures["rollouts"]
    swap_parts = ", ".join(f"{k} {statistics.median(s[k] for s in swaps):.3f}" for k in swaps[0])
    http, direct, service = rollouts["http"], rollouts["direct"], rollouts["service"]
    wire_ms = statistics.median(h - s for h, s in zip(http["seconds"], http["server_seconds"], strict=True)) * 1000
    service_ms = statistics.median(s - d for s, d in zip(service["seconds"], direct["seconds"], strict=True)) * 1000
    direct_s = statistics.median(direct["seconds"])
    engines = statistics.median(h / d - 1 for h, d in zip(http["seconds"], direct["seconds"], strict=True))
    overhead = (wire_ms + service_ms) / 1000 / direct_s
    same = "yes" if http["token_ids"] == direct["token_ids"] else "no"
    batch = f"{w.prompts_per_step} prompts x {w.n} x {w.max_tokens} tokens from the base"
    return "\n".join(
        [
            f"| tiny model (hot-swaps: medians of {repeats}; rollouts: {len(direct['seconds'])} rounds) | s | |",
            "|---|---|---|",
            f"| hot-swap ({figures['adapter_serving']} serving, as the learner's local server): save + load + verify "
            f"| {statistics.median(sum(s.values()) for s in swaps):.3f} | {swap_parts} |",
            f"| rollout {batch} through AsyncLLM | {direct_s:.3f} | |",
            f"| the same through the server's RolloutService on that engine "
            f"| {statistics.median(service['seconds']):.3f} | {service_ms:+.1f} ms, median of the differences |",
            f"| the same over HTTP (RolloutClient) to the server | {statistics.median(http['seconds']):.3f} "
            f"| HTTP + JSON {wire_ms:.1f} ms (client's time less the server's own); same completions: {same} |",
            f"| server overhead over AsyncLLM: HTTP + JSON + RolloutService | {overhead * 100:+.1f}% "
            f"| target < 5% (HTTP to the server's engine against this one's: {engines * 100:+.1f}%, "
            "two engine instances) |",
        ]
    )


# --- main -----------------------------------------------------------------------------------------


def run_spec(text: str) -> tuple[str, int]:
    """'25m:256' -> ('25m', 256)."""
    size, _, tokens = text.partition(":")
    if size not in ("tiny", "25m") or not tokens.isdigit() or int(tokens) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIZE:TOKENS, SIZE tiny or 25m, e.g. 25m:256")
    return size, int(tokens)


def matmul_gflops(hidden: int, rows: int = 2048, repeats: int = 5) -> float:
    """float32 matmul throughput here: [rows, hidden] x [hidden, 4 * hidden], the best of `repeats`."""
    a, b = torch.randn(rows, hidden), torch.randn(hidden, 4 * hidden)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * rows * hidden * 4 * hidden / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def update_floor_s(run_dir: Path, params: int, gflops: float, prompt_tokens: float, completions: int) -> float:
    """Seconds the learner's update takes at least: 6 x params x tokens (reference forward, policy
    forward, backward through the base) at `gflops`, tokens from metrics.jsonl's completion_len."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    completion_tokens = statistics.median(r["completion_len"] for r in rows)
    return 6 * params * completions * (prompt_tokens + completion_tokens) / (gflops * 1e9)


def speed_lines(runs: dict[str, list[RunFigures]], floors: dict[str, float]) -> str:
    lines = []
    for key, (trl, ours) in runs.items():
        ratio = statistics.median(trl.seconds) / statistics.median(ours.seconds)
        update = statistics.median(p.get("update", 0.0) for p in ours.phases)
        lines.append(
            f"{key}: grpo-learner {ratio:.2f}x TRL's speed; its update {update:.2f} s, floor {floors[key]:.2f} s "
            f"(6 x params x tokens at this machine's float32 matmul throughput)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per run, after 1 warm-up step")
    parser.add_argument(
        "--runs",
        nargs="*",
        type=run_spec,
        default=[("tiny", 32), ("25m", 32), ("25m", 256)],
        metavar="SIZE:TOKENS",
        help="model (tiny or 25m) and completion length of each run (none: serving only)",
    )
    parser.add_argument("--serving-repeats", type=int, default=10, help="timed hot-swaps")
    parser.add_argument(
        "--rollout-pairs", type=int, default=40, help="rounds of rollouts timed each way (HTTP, AsyncLLM, service)"
    )
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs/bench-compare", help="models, runs, results")
    parser.add_argument(
        "--trl-python", type=Path, default=Path(sys.executable), help="a python with TRL (default: this one)"
    )
    args = parser.parse_args()
    if not args.trl_python.is_file():
        raise SystemExit(f"no python at {args.trl_python}: `make setup` installs TRL into .venv")
    w = Workload()
    threads = torch.get_num_threads()  # torch's default here: grpo-learner's too, as it sets none
    steps = args.steps + 1  # the warm-up step first
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    builders = {
        "tiny": lambda: build_tiny_model(work / "models/tiny", seed=0),
        "25m": lambda: build_qwen2_25m(work / "models/qwen2-25m"),
    }
    models = {size: builders[size]() for size in dict.fromkeys(size for size, _ in args.runs)}
    params = {size: parameter_count(path) for size, path in models.items()}
    sampler = PromptSampler(load_rows(DATA, "unsupervised"), w.prompts_per_step, w.seed)
    prompts = [row.text for _ in range(steps) for row in sampler.next_batch()]
    tokenizer = AutoTokenizer.from_pretrained(next(iter(models.values()))) if models else None
    prompt_tokens = statistics.mean(len(tokenizer(p)["input_ids"]) for p in prompts) if tokenizer else 0.0

    runs: dict[str, list[RunFigures]] = {}
    workloads: dict[str, Workload] = {}
    floors: dict[str, float] = {}
    for size, tokens in args.runs:
        key = f"{size} at {tokens} tokens"
        workloads[key] = run_w = Workload(max_tokens=tokens)
        runs[key] = []
        for system in ("trl", "grpo-learner"):
            out = work / f"{size}-{tokens}" / system
            shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl and adapter versions would carry on
            out.mkdir(parents=True)
            # Other processes on the CPUs slow both systems: the load average says whether any ran.
            load = os.getloadavg()[0]
            print(
                f"[bench-compare] {system} on {key}: {steps} steps (load average {load:.2f}; log in {out})", flush=True
            )
            if system == "trl":
                runs[key].append(run_trl(args.trl_python, models[size], out, prompts, run_w, steps, threads))
            else:
                runs[key].append(run_learner(models[size], out, run_w, steps))
        hidden = json.loads((models[size] / "config.json").read_text())["hidden_size"]
        floors[key] = update_floor_s(out / "run", params[size], matmul_gflops(hidden), prompt_tokens, w.completions)

    # The training figures are kept and shown before the serving ones are taken: a failure there
    # loses nothing measured so far.
    results = {"workload": asdict(w), "threads": threads, "params": params, "update_floor_s": floors}
    results["runs"] = {key: [asdict(f) for f in figures] for key, figures in runs.items()}
    results["workloads"] = {key: asdict(run_w) for key, run_w in workloads.items()}
    (work / "results.json").write_text(json.dumps(results, indent=1))
    if runs:
        print()
        print(training_table(runs, params, w, args.steps), flush=True)
        print()
        print(speed_lines(runs, floors), flush=True)

    serving_dir = work / "serving"
    shutil.rmtree(serving_dir, ignore_errors=True)
    serving_dir.mkdir(parents=True)
    print("\n[bench-compare] serving: rollouts over HTTP and through AsyncLLM directly, hot-swaps", flush=True)
    results["serving"] = serving_figures(builders["tiny"](), serving_dir, w, args.serving_repeats, args.rollout_pairs)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print()
    print(serving_table(results["serving"], w, args.serving_repeats))

    from swap import swap_figures  # bench/swap.py, which builds on this module's models

    cores = len(os.sched_getaffinity(0))
    print(
        f"\n[bench-compare] swaps merged in place at 25M and ~100M ({cores} engine threads, bench/swap.py)", flush=True
    )
    shutil.rmtree(work / "swaps", ignore_errors=True)
    swaps = [
        swap_figures(n, work / "swaps", args.serving_repeats - 1, ("inplace",), cores, work / "models")
        for n in ("25m", "100m")
    ]
    results["swaps"] = {label: {k: v for k, v in f["inplace"].items() if k != "samples"} for label, f in swaps}
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print()
    copy_gbps = copy_bandwidth_gbps(cores)
    results["copy_gbps"] = copy_gbps
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(swap_table(results["swaps"], copy_gbps))
    print(f"\n{threads} torch threads each; every figure in {work / 'results.json'}")


def copy_bandwidth_gbps(threads: int, megabytes: int = 256, repeats: int = 5) -> float:
    """This machine's float32 copy rate with `threads` torch threads, GB copied per second (each
    byte read once and written once), the best of `repeats`."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(megabytes * 2**20 // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)  # warm-up: the pages are touched
        best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    finally:
        torch.set_num_threads(before)
    return src.numel() * 4 / best / 1e9


def swap_table(swaps: dict[str, dict], copy_gbps: float) -> str:
    """The in-place swap of each model (POST /v1/load_lora_adapter, as the learner's publish sends
    it), and the floor of the engine's part: every targeted weight is merged from the base copy
    (one copy's traffic) and packed again for oneDNN (another), at this machine's copy rate."""
    lines = [
        "| model | first load | median (min-max) of the rest | engine's merge and repack (median) | its floor "
        "| target |",
        "|---|---|---|---|---|---|",
    ]
    for label, f in swaps.items():
        floor = 2 * f["targeted_params"] * 4 / (copy_gbps * 1e9)
        target = "under 0.1 s: " + ("met" if f["median"] < 0.1 else "not met")
        lines.append(
            f"| {label} | {f['first']:.3f} s | {f['median']:.3f} s ({f['min']:.3f}-{f['max']:.3f}) "
            f"| {f['engine_median']:.3f} s | {floor:.3f} s ({f['targeted_params'] / 1e6:.1f}M weights twice "
            f"at {copy_gbps:.1f} GB/s) | {target} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
