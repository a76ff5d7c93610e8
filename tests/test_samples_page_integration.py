"""The samples page in a real headless browser (Debian's chromium) against the real server (real
vLLM on CPU, the tiny model, an API key): after the page's script ran, the DOM holds the completion
that was just generated and the scores posted for it. A screenshot is kept in test-artifacts/."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from tests.conftest import KEYED_SERVER_KEY, KeyedServer

pytestmark = pytest.mark.integration

KEY = KEYED_SERVER_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium; CI installs it (.ci/run), so there it must be found."""
    path = shutil.which("chromium")
    if path is None:
        reason = "chromium is not installed (apt-get install chromium); the samples page's browser test needs it"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def server(keyed_server: KeyedServer) -> tuple[str, Path]:
    """The shared real server with the API key set, and its log."""
    return keyed_server.url, keyed_server.log


class _PageText(HTMLParser):
    """The texts of the elements whose class list holds a given class (none of them nested)."""

    def __init__(self, cls: str) -> None:
        super().__init__()
        self.cls, self.texts, self._inside = cls, [], False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.cls in (dict(attrs).get("class") or "").split():
            self.texts.append("")
            self._inside = True

    def handle_endtag(self, tag: str) -> None:
        self._inside = False

    def handle_data(self, data: str) -> None:
        if self._inside:
            self.texts[-1] += data


def texts_of(dom: str, cls: str) -> list[str]:
    parser = _PageText(cls)
    parser.feed(dom)
    return parser.texts


def run_chromium(chromium: str, profile: Path, *args: str) -> str:
    """Run headless chromium with `args`; its stdout. Virtual time lets the page's script run its
    first polls of /v1/samples (the fetches themselves are real) before the DOM is taken."""
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",  # as root, in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=8000",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_page_shows_a_fresh_completion_with_its_scores(
    server: tuple[str, Path], chromium: str, tmp_path: Path
) -> None:
    url, log = server
    body = {"prompts": ["12+7="], "n": 2, "max_tokens": 8, "seed": 0}
    r = httpx.post(f"{url}/v1/rollouts", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    rollout = r.json()
    completions = [c["text"] for c in rollout["results"][0]["completions"]]
    scores = {"rewards": [[0.25, 0.75]], "advantages": [[-1.0, 1.0]], "step": 1, "components": {"exact": [[0.0, 1.0]]}}
    r = httpx.post(f"{url}/v1/samples/{rollout['rollout_id']}/scores", json=scores, headers=AUTH)
    assert r.status_code == 200, r.text

    page = f"{url}/ui?key={KEY}"
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "samples_page.png"
    screenshot.unlink(missing_ok=True)
    # The screenshot first: it is kept for a person to look at, whatever the assertions find.
    run_chromium(chromium, tmp_path / "profile-shot", f"--screenshot={screenshot}", "--window-size=1280,1400", page)
    dom = run_chromium(chromium, tmp_path / "profile-dom", "--dump-dom", page)

    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # newest first: this rollout's card leads (the shared server holds other tests' rollouts too)
    assert texts_of(dom, "completion-text")[:2] == completions  # drawn by the script from /v1/samples
    assert texts_of(dom, "reward")[:2] == ["0.250", "0.750"]
    assert texts_of(dom, "advantage")[:2] == ["-1.000", "1.000"]
    assert texts_of(dom, "component")[:2] == ["0.000", "1.000"]
    assert rollout["rollout_id"] in dom and "<circle" in dom  # the meta line; the plot's one step
    # The browser sent the key as ?key=; the access log shows the request but not the key.
    server_log = log.read_text()
    assert '"GET /ui HTTP/1.1" 200' in server_log
    assert KEY not in server_log


def test_the_page_shows_token_id_prompts_as_text_the_answer_each_runs_curve_and_two_versions(
    server: tuple[str, Path], chromium: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Issue 20: a learner's rollouts (prompts as token ids) showed no prompt; the plot drew one
    curve for every run; no two versions could be compared."""
    url, _ = server
    prompt_ids = AutoTokenizer.from_pretrained(str(tiny_model_dir)).encode("37+14=", add_special_tokens=False)
    completions = {}
    for adapter, step in ((None, 1), ("policy", 2)):  # v0 (the base) and v1
        body = {"prompt_token_ids": [prompt_ids], "n": 1, "max_tokens": 6, "seed": 0, "temperature": 0}
        body |= {"adapter": adapter, "run": "ui-run", "kind": "evaluation"}
        r = httpx.post(f"{url}/v1/rollouts", json=body, headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        rollout = r.json()
        completions[adapter] = rollout["results"][0]["completions"][0]["text"]
        scores = {"rewards": [[float(step)]], "advantages": [[0.0]], "step": step, "answers": ["51"]}
        r = httpx.post(f"{url}/v1/samples/{rollout['rollout_id']}/scores", json=scores, headers=AUTH)
        assert r.status_code == 200, r.text

    dom = run_chromium(chromium, tmp_path / "profile", "--dump-dom", f"{url}/ui?key={KEY}&run=ui-run")
    assert texts_of(dom, "prompt-text") == ["37+14=", "37+14="]  # decoded by the server from the token ids
    assert texts_of(dom, "answer-text") == ["51", "51"]
    legend = texts_of(dom, "legend-name")  # one curve per run, kind and adapter: this run's two
    assert sorted(legend) == ["ui-run · evaluation", "ui-run · evaluation · policy"]
    # the newest version against the oldest: v1 (policy) beside v0 (the base), for the same prompt
    assert texts_of(dom, "compare-prompt") == ["37+14="]
    assert texts_of(dom, "compare-a") == [completions["policy"] or "(empty)"]
    assert texts_of(dom, "compare-b") == [completions[None] or "(empty)"]
