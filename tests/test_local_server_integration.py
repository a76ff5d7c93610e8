"""Server settings from the learner, against real server processes (real vLLM) and a model of
256 positions: the server's default length is the model's own, and a start-up that vLLM refuses
is reported with its cause."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from learner.cli import main
from shared.errors import RolloutServerError
from shared.schemas import RolloutRequest
from tests.servers import served_client

pytestmark = pytest.mark.integration

POSITIONS = 256


@pytest.fixture(scope="module")
def short_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with max_position_embeddings 256 (its RoPE has no other length limit)."""
    model_dir = tmp_path_factory.mktemp("short") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = POSITIONS
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model_dir


def test_a_model_of_256_positions_serves_up_to_its_own_limit(short_model_dir: Path, tmp_path: Path) -> None:
    # No --max-model-len: vLLM derives 256 from the model (a fixed 512 refused to start).
    with served_client(short_model_dir, tmp_path) as client:
        fits = RolloutRequest(prompt_token_ids=[[5] * 250], n=1, max_tokens=6)  # 250 + 6 = 256
        assert len(client.generate(fits, expected_version=0).results[0].completions) == 1
        with pytest.raises(RolloutServerError) as e:
            client.generate(fits.model_copy(update={"max_tokens": 7}), expected_version=0)
        assert e.value.status_code == 422 and "max_model_len=256" in e.value.detail


def test_the_learner_names_why_its_local_server_did_not_start(
    short_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A server setting passed through the learner's config: max_model_len above the model's 256.
    argv = ["--model", str(short_model_dir), "--data", "examples/unsupervised.jsonl", "--steps", "1"]
    argv += ["--output-dir", str(tmp_path), "--server", json.dumps({"max_model_len": 512})]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("grpo-learner: error:"))
    # One line with vLLM's reason, not "rollout server answered 0" and a pointer to the log.
    assert "exited with" in line and "during start-up" in line
    assert "User-specified max_model_len (512) is greater than the derived max_model_len" in line
    assert str(tmp_path / "server.log") in line
