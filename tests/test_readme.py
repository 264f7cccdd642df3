"""The README is true: every `$ imitate ...` line runs and exits 0.

What the test changes, and nothing else (`rewrite` and `QUICK` below):
- outputs under `data/runs/` go to a temporary folder;
- the CLI tour's fake teacher (`--port 8089`) gets a free port;
- `https://api.openai.com/v1` is a loopback fake teacher the test starts (no faults), with `OPENAI_API_KEY` set to
  a dummy; a `--config` file naming that URL is copied with the URL replaced;
- the served model (the SmolLM2 GGUF path) is a tiny random LLaMA folder, and `127.0.0.1:8000` / `--port 8000`
  a free port;
- commands that train or run a model use the tiny model and are made quick: `train` without `--model` gets
  `--model TINY` (and `--set train.max_steps=2` unless it is `--check`; `--estimate-memory` runs as written, it
  reads only the real model's config), `eval ...` without `--model` gets `--model TINY`, and `eval bench|judge|
  lm-eval` get `--limit`, a short `--max-new-tokens` and `--threads 1` where the line has none; the harvest
  against the local server gets a short `max_tokens`;
- `--hub` pushes to a loopback fake Hub (tests/hub_fixtures.py) with `HF_TOKEN` set.
The CLI tour (reference sections) and the workflow (the "## Workflow" section) are separate tests.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
OPENAI = "https://api.openai.com/v1"
SERVED = "~/.cache/imitate/models/SmolLM2-135M-Instruct.Q4_1.gguf"
QUICK = {  # command prefix -> options appended (the README shows the real run; the test keeps it short)
    "eval bench": ["--limit", "3", "--max-new-tokens", "16", "--threads", "1"],
    "eval judge": ["--limit", "2", "--max-new-tokens", "16"],
    "eval lm-eval": ["--limit", "3"],
}


def commands(text: str) -> list[str]:
    text = text.replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(r"^\$ (imitate .*)$", text, re.M)]


def readme_parts() -> tuple[list[str], list[str]]:
    """(`$` lines of the workflow section, `$` lines everywhere else)."""
    text = (REPO / "README.md").read_text()
    start, end = text.index("\n## Workflow\n"), text.index("\n## How it works\n")
    return commands(text[start:end]), commands(text[:start] + text[end:])


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


class Runner:
    """Runs README lines one after another in fresh processes; `&` lines stay up until `close()`."""

    def __init__(self, tmp: Path, subs: dict[str, str], env: dict[str, str], tiny: Path):
        self.tmp, self.subs, self.env, self.tiny = tmp, subs, env, tiny
        self.background: list[subprocess.Popen] = []
        self.hub_env: dict[str, str] | None = None

    def argv(self, cmd: str) -> list[str]:
        for a, b in self.subs.items():
            cmd = cmd.replace(a, b)
        args = shlex.split(cmd.rstrip("&").strip())[1:]
        for i, a in enumerate(args[:-1]):  # a config naming the OpenAI URL: a copy pointing at the fake teacher
            if a in ("--config", "-c") and OPENAI in (text := (REPO / args[i + 1]).read_text()):
                copy = self.tmp / "configs" / Path(args[i + 1]).name
                copy.parent.mkdir(exist_ok=True)
                copy.write_text(text.replace(OPENAI, self.subs[OPENAI]))
                args[i + 1] = str(copy)
        if args[0] == "train" and "--model" not in args and "--estimate-memory" not in args:
            args += ["--model", str(self.tiny)] + ([] if "--check" in args else ["--set", "train.max_steps=2"])
        if args[0] == "harvest" and "--model" in args and args[args.index("--model") + 1] == "smollm2":
            args += ["--set", "harvest.params.max_tokens=32"]
        if args[0] == "eval" and "--model" not in args:
            args += ["--model", str(self.tiny)]
        quick = next((v for k, v in QUICK.items() if " ".join(args[:2]) == k), [])
        for opt, value in zip(quick[::2], quick[1::2], strict=True):
            args += [] if opt in args else [opt, value]
        return [sys.executable, "-m", "imitate.cli", *args]

    def run(self, cmd: str) -> subprocess.CompletedProcess | None:
        argv = self.argv(cmd)
        if cmd.endswith("&"):
            p = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=subprocess.PIPE, text=True)
            self.background.append(p)
            line = p.stdout.readline()
            assert "listening" in line or line.startswith("imitate serve:"), f"{cmd}: {line!r}"
            return None
        env = self.hub_env if "--hub" in argv else self.env
        r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{cmd}\n{argv}\n{r.stdout}\n{r.stderr}"
        return r

    def close(self) -> None:
        for p in self.background:
            p.terminate()
            p.communicate(timeout=20)


def base_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OPENAI_API_KEY": "sk-readme-test-key"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaMA with the SmolLM2 tokenizer, saved as a model folder: the student and served model."""
    from train_fixtures import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("readme") / "tiny-model")


def test_readme_cli_tour_runs(tmp_path: Path, tiny: Path):
    cmds = readme_parts()[1]
    assert len(cmds) >= 15
    runner = Runner(tmp_path, {"8089": free_port(), "data/runs/": f"{tmp_path}/runs/"}, base_env(), tiny)
    try:
        for cmd in cmds:
            runner.run(cmd)
    finally:
        runner.close()
    assert (tmp_path / "runs" / "tour" / "manifest.json").exists()


def test_readme_workflow_runs(tmp_path: Path, tiny: Path):
    """OpenAI (two teachers, dry run, run, status), a served model, then curate, train, eval, export to the Hub."""
    from hub_fixtures import FakeHub

    cmds = readme_parts()[0]
    assert any(OPENAI in c for c in cmds) and any(c.startswith("imitate serve") for c in cmds)
    assert any("--hub" in c for c in cmds) and any("--dry-run" in c for c in cmds)
    env = base_env()
    teacher = subprocess.Popen(
        [sys.executable, "-m", "imitate.cli", "fake-teacher", "--port", "0"], env=env, stdout=subprocess.PIPE, text=True
    )
    line = teacher.stdout.readline()
    assert line.startswith("fake teacher listening on "), line
    port = free_port()
    subs = {
        OPENAI: line.split()[-1],
        SERVED: str(tiny),
        "127.0.0.1:8000": f"127.0.0.1:{port}",
        "--port 8000": f"--port {port}",
        "data/runs/": f"{tmp_path}/runs/",
    }
    runner = Runner(tmp_path, subs, env, tiny)
    token = "hf_readme_test_token_123456"
    hub = FakeHub(token=token)
    runner.hub_env = {k: v for k, v in env.items() if not k.startswith(("HF_", "HUGGING"))} | {
        "HF_ENDPOINT": "",  # set below, once the Hub listens
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": token,
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }
    try:
        with hub:
            runner.hub_env["HF_ENDPOINT"] = hub.base_url
            outputs = {cmd: runner.run(cmd) for cmd in cmds}
            pushed = dict(hub.repos)
    finally:
        runner.close()
        teacher.terminate()
        teacher.communicate(timeout=20)
    runs = tmp_path / "runs"
    dry = next(r.stdout for c, r in outputs.items() if "--dry-run" in c and "openai.config" in c)
    assert {"gpt4o", "gpt4o-mini"} <= set(re.findall(r'"(gpt4o[\w-]*)": \{', dry))  # two teachers planned
    assert '"done": 24' in next(r.stdout for c, r in outputs.items() if c.startswith("imitate status data/runs/openai"))
    for folder in ("openai", "openai-mini", "local"):
        assert (runs / folder / "manifest.json").exists(), folder
        assert "sk-readme-test-key" not in "".join(p.read_text() for p in (runs / folder).glob("*.json*"))
    assert (runs / "student" / "adapter").is_dir()
    report = (runs / "student-eval" / "report.md").read_text()
    assert "judge" in report and "lm-eval" in report and "general_mc" in report
    assert [repo["private"] for repo in pushed.values()] == [True]


def test_readme_illustrations_parse():
    """Lines shown without `$` (they need a real key, a Hub dataset or a long run) still name real commands and
    options: each is parsed by the CLI (unknown command or option -> exit 2) with `--help` appended, nothing run."""
    from typer.testing import CliRunner

    from imitate.cli import app

    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    code = "\n".join(re.findall(r"^```console\n(.*?)^```", text, re.M | re.S))  # fenced examples
    code += "\n" + "\n".join(re.findall(r"^    (imitate .*)$", text, re.M))  # indented examples
    lines = [m.group(1) for m in re.finditer(r"^(imitate [a-z].*)$", code, re.M)]
    assert len(lines) >= 5
    for line in lines:
        args = shlex.split(line, comments=True)[1:]
        r = CliRunner().invoke(app, [*args, "--help"])
        assert r.exit_code == 0, f"{line}\n{r.output}"
    r = CliRunner().invoke(app, ["train", "x", "--out", "y", "--no-such-option", "--help"])
    assert r.exit_code == 2  # the check would catch a stale option
