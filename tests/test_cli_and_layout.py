"""The CLI frame and the architecture rules: one-line errors with exit codes, lazy heavy imports,
dependency direction checked on the source, the pinned public API."""

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import imitate
from imitate.cli import main

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "imitate"
IMITATE = Path(sys.executable).parent / "imitate"  # the console script a user runs


def run_imitate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(IMITATE), *args], capture_output=True, text=True, cwd=REPO, timeout=120)


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
    allowed = ("imitate/train/", "imitate/evaluate/", "imitate/serve/")
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


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path: Path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("harvest:\n  sed: 1\n")
    r = run_cli("--debug", "config", "show", "--config", str(cfg))
    assert r.returncode == 2 and "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ConfigError")


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
        str(p.relative_to(REPO))
        for p in PKG.rglob("*.py")
        if ("asyncio.run(" in p.read_text() or "asyncio.Runner(" in p.read_text()) and "test" not in p.name
    )
    assert users == ["imitate/cli.py", "imitate/teacher/fake/runner.py"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["harvest", "q.jsonl", "--rpm", "abc"], "Invalid value for '--rpm'"),
        (["harvest", "q.jsonl", "--no-such-option"], "No such option: --no-such-option"),
        (["bogus"], "No such command 'bogus'"),
        (["config", "show", "--config", "."], "is a directory"),
        (["harvest", "status", "data/runs/x"], "unexpected extra argument"),
        (["status"], "Missing argument 'DIR'"),
    ],
)
def test_usage_errors_print_the_usage_line_and_exit_2(args: list[str], needle: str):
    r = run_imitate(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("Usage: imitate") and needle in r.stderr, r.stderr


# Runs the real console script with an import hook that stops start-up at the import of one module until the test
# has sent SIGINT: a Ctrl-C at exactly that moment, without guessing it with sleeps.
_AT_IMPORT = """
import runpy, sys
module, script = sys.argv[1], sys.argv[2]
class Gate:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            sys.meta_path.remove(self)
            print("AT", name, flush=True)
            sys.stdin.readline()  # blocks until SIGINT interrupts it
        return None
sys.meta_path.insert(0, Gate())
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def ctrl_c_at_import(module: str, *args: str) -> subprocess.CompletedProcess:
    p = subprocess.Popen(
        [sys.executable, "-c", _AT_IMPORT, module, str(IMITATE), *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout.readline() == f"AT {module}\n"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("imitate.cli", ["--version"]),  # before the CLI module exists: caught by imitate/__main__.py
        ("typer", ["--version"]),
        ("pydantic", ["config", "show"]),  # inside a command: typer turns it into Exit(130), main() keeps it
        ("imitate.harvest.run", ["harvest", "q.jsonl", "--out", "data/runs/never", "--quiet"]),
        ("transformers", ["train", "data.jsonl", "--out", "data/runs/never"]),
    ],
)
def test_ctrl_c_at_start_up_and_in_commands_exits_130_with_a_message(module: str, args: list[str]):
    r = ctrl_c_at_import(module, *args)
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "interrupted (Ctrl-C)"
    assert not (REPO / "data" / "runs" / "never").exists()


def test_a_bad_out_is_one_input_error_before_any_work(tmp_path: Path):
    src = tmp_path / "q.jsonl"
    src.write_text('{"question": "hi"}\n')
    a_file = tmp_path / "taken"
    a_file.write_text("keep me")
    unused = "http://127.0.0.1:9/v1"  # nothing listens there: any request would fail differently
    for out, needle in [
        (a_file, "exists and is not a directory"),
        (a_file / "sub", "cannot write there"),
        (Path("/sys/imitate-out"), "cannot write there"),  # unwritable even for root
    ]:
        r = run_imitate("harvest", str(src), "--out", str(out), "--base-url", unused, "--quiet")
        assert r.returncode == 3, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: InputError: --out {out}") and needle in lines[0]
    assert a_file.read_text() == "keep me"


def test_a_read_only_out_is_one_input_error(tmp_path: Path):
    src = tmp_path / "q.jsonl"
    src.write_text('{"question": "hi"}\n')
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    # root writes into a mode-500 directory; sysfs refuses even root a new directory
    where = Path("/sys/imitate-test-out") if os.geteuid() == 0 else locked / "o"
    r = run_imitate("harvest", str(src), "--out", str(where), "--quiet")
    assert r.returncode == 3 and "cannot write there" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not where.exists()


@pytest.mark.parametrize("url", ["ftp://h/v1", "127.0.0.1:8089/v1", "http://h:99999/v1", "http://[::1/v1"])
def test_a_bad_base_url_is_one_config_error(tmp_path: Path, url: str):
    r = run_imitate("harvest", "q.jsonl", "--out", str(tmp_path / "o"), "--base-url", url)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ConfigError") and "base_url" in lines[0]
    assert not (tmp_path / "o").exists()


def test_a_missing_local_looking_input_is_one_input_error(tmp_path: Path):
    r = run_imitate("harvest", "./no-such-questions", "--out", str(tmp_path / "o"), "--quiet")
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip() == "error: InputError: ./no-such-questions: no such file or folder"
