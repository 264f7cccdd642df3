"""The CLI frame and the architecture rules: one-line errors with exit codes, lazy heavy imports,
dependency direction checked on the source, the pinned public API."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import imitate
from imitate.cli import main

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "imitate"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imitate.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_teacher_client_imports_openai():
    users = sorted(str(p.relative_to(REPO)) for p in PKG.rglob("*.py") if "openai" in _imports(p))
    assert users == ["imitate/teacher/client.py"]


def test_torch_family_only_in_model_running_code():
    allowed = ("imitate/train/", "imitate/evaluate/", "imitate/serve.py")
    heavy = {"torch", "transformers", "peft", "bitsandbytes", "flash_attn", "trl"}
    offenders = [
        str(p.relative_to(REPO))
        for p in PKG.rglob("*.py")
        if _imports(p) & heavy and not str(p.relative_to(REPO)).startswith(allowed)
    ]
    assert offenders == []


def test_help_imports_neither_torch_nor_openai():
    code = (
        "import sys; from imitate.cli import main; rc = main(['--help']); "
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'openai') if m in sys.modules), rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "HEAVY [] 0" in out.stdout, out.stdout + out.stderr
    assert "harvest" in out.stdout and "fake-teacher" in out.stdout


def test_version_and_config_show(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"imitate {imitate.__version__}"
    assert main(["config", "show", "--set", "harvest.seed=7"]) == 0
    assert "seed: 7" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("harvest:\n  seed: [1\n", "bad.yaml:"),
        ("harvest:\n  sed: 1\n", "harvest.sed: unknown key"),
    ],
)
def test_bad_config_is_one_line_and_nonzero(tmp_path: Path, content: str, needle: str):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    r = run_cli("config", "show", "--config", str(cfg))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ConfigError") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_debug_shows_the_traceback(tmp_path: Path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("harvest:\n  sed: 1\n")
    r = run_cli("--debug", "config", "show", "--config", str(cfg))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_missing_env_var_for_key_is_one_line(tmp_path: Path):
    (tmp_path / "q.jsonl").write_text('{"question": "hi"}\n')
    r = run_cli(
        "harvest",
        str(tmp_path / "q.jsonl"),
        "--out",
        str(tmp_path / "o"),
        "--api-key-env",
        "IMITATE_NOPE_KEY",
        "--quiet",
        env={"IMITATE_NOPE_KEY": ""},
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ConfigError: environment variable IMITATE_NOPE_KEY")


def test_public_api_is_pinned_and_sorted():
    assert imitate.__all__ == sorted(imitate.__all__)
    assert imitate.__all__ == [
        "ConfigError",
        "GenerationParams",
        "ImitateError",
        "InputError",
        "Message",
        "Provenance",
        "Query",
        "Record",
        "Request",
        "TeacherError",
        "TrainError",
        "Usage",
        "__version__",
    ]


def test_every_module_has_a_docstring():
    missing = [
        str(p.relative_to(REPO)) for p in PKG.rglob("*.py") if ast.get_docstring(ast.parse(p.read_text())) is None
    ]
    assert missing == []


def test_asyncio_run_only_at_entry_points():
    """cli.py holds the only asyncio.run of the library; the fake teacher's own process entry is the exception."""
    users = sorted(
        str(p.relative_to(REPO)) for p in PKG.rglob("*.py") if "asyncio.run(" in p.read_text() and "test" not in p.name
    )
    assert users == ["imitate/cli.py", "imitate/teacher/fake/runner.py"]
