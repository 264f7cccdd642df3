"""The README's CLI tour is true: every `$ imitate ...` line runs and exits 0 (port and output dir rewritten)."""

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


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    text = text.replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(r"^\$ (imitate .*)$", text, re.M)]


def test_readme_cli_tour_runs(tmp_path: Path):
    cmds = readme_commands()
    assert len(cmds) >= 5
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    background = []
    try:
        for cmd in cmds:
            cmd = cmd.replace("8089", port).replace("data/runs/tour", str(tmp_path / "tour"))
            argv = shlex.split(cmd.rstrip("&").strip())
            argv = [sys.executable, "-m", "imitate.cli", *argv[1:]]
            if cmd.endswith("&"):
                p = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
                assert "listening" in p.stdout.readline()
                background.append(p)
                continue
            r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
    finally:
        for p in background:
            p.terminate()
            p.communicate(timeout=10)
    assert (tmp_path / "tour" / "manifest.json").exists()
