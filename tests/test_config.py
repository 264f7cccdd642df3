"""Typed config: layering, every problem reported with its key path, secrets never printed or written."""

import os
from pathlib import Path

import pytest

from imitate.config import (
    load_config,
    redact,
    redact_command,
    redact_text,
    redact_url,
    resolve_api_key,
    stamp,
    to_yaml,
)
from imitate.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_file_and_overrides_layer(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("harvest:\n  params:\n    temperature: 0.3\n    max_tokens: 64\n  seed: 4\n")
    cfg = load_config(f, ["harvest.params.temperature=0.9", "harvest.teachers.0.rpm=500"])
    assert cfg.harvest.params.temperature == 0.9  # --set wins over the file
    assert cfg.harvest.params.max_tokens == 64  # file wins over defaults
    assert cfg.harvest.teachers[0].rpm == 500
    assert cfg.harvest.seed == 4


def test_all_problems_reported_at_once_with_paths(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "harvest:\n  params:\n    temperature: 9\n  bogus: 1\n  teachers:\n    - name: a\n      rpm: -5\n"
        "      api_key: sk-oops\nprices:\n  gpt: {input_per_mtok: -1}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = e.value.one_line()
    for path in [
        "harvest.params.temperature",
        "harvest.bogus: unknown key",
        "harvest.teachers.0.rpm",
        "harvest.teachers.0.api_key: unknown key (put the key in an environment variable",
        "prices.gpt.input_per_mtok",
    ]:
        assert path in msg, path
    assert len(e.value.problems) == 5
    assert "sk-oops" not in msg  # the rejected secret is not echoed back
    assert "\n" not in msg


def test_bad_yaml_names_file_and_line(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("harvest:\n  params: [1, 2\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+:\d+"):
        load_config(f)


def test_missing_file_and_bad_override(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["harvest.seed"])


def test_missing_env_var_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("IMITATE_TEST_KEY", raising=False)
    cfg = load_config(None, ["harvest.teachers.0.api_key_env=IMITATE_TEST_KEY"])
    with pytest.raises(ConfigError, match="IMITATE_TEST_KEY .* is not set"):
        resolve_api_key(cfg.harvest.teachers[0])
    monkeypatch.setenv("IMITATE_TEST_KEY", "sk-live-123456789")
    assert resolve_api_key(cfg.harvest.teachers[0]) == "sk-live-123456789"


def test_secrets_never_printed_or_written(monkeypatch, tmp_path: Path):
    secret = "sk-proj-SECRET-abcdef123456"
    monkeypatch.setenv("MY_KEY", secret)
    cfg = load_config(
        None,
        [
            "harvest.teachers.0.api_key_env=MY_KEY",
            f"harvest.teachers.0.base_url=https://user:{secret}@api.example.com/v1",
        ],
    )
    text = to_yaml(cfg, "imitate harvest x")
    assert secret not in text
    assert "MY_KEY" in text  # the env var *name* is fine to show
    written = stamp(cfg, tmp_path / "out", "imitate harvest x").read_text()
    assert secret not in written
    assert written.startswith("# imitate harvest x\n")
    assert redact({"api_key": "abc", "nested": [{"token": "t"}], "ok": "x"}) == {
        "api_key": "***",
        "nested": [{"token": "***"}],
        "ok": "x",
    }


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://host/v1", "must start with http:// or https://"),
        ("127.0.0.1:8089/v1", "must start with http:// or https://"),
        ("api.openai.com/v1", "must start with http:// or https://"),
        ("http://127.0.0.1:99999/v1", "Port out of range"),
        ("http://host:abc/v1", "not a valid URL"),
        ("http://host:0/v1", "port 0"),
        ("http://[::1/v1", "Invalid IPv6 URL"),
        ("http:///v1", "has no host"),
        ("http://user:sk-URL-SECRET-1234@[::1/v1", "Invalid IPv6 URL"),
    ],
)
def test_bad_base_url_is_one_config_error(url: str, why: str):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"harvest.teachers.0.base_url={url}"])
    line = e.value.one_line()
    assert "harvest.teachers.0.base_url:" in line and why in line and "\n" not in line
    assert "sk-URL-SECRET" not in line


@pytest.mark.parametrize(
    "url", ["https://api.openai.com/v1", "http://[::1]:8089/v1", "HTTP://Example.com/v1", "http://u:p@h:1/v1"]
)
def test_good_base_urls_load(url: str):
    assert load_config(None, [f"harvest.teachers.0.base_url={url}"]).harvest.teachers[0].base_url == url


def test_url_credentials_are_redacted_user_and_password():
    assert redact_url("http://user:sk-KEY@host:8/v1") == "http://***@host:8/v1"
    assert redact_url("https://sk-KEY@host/v1") == "https://***@host/v1"
    assert redact_url("http://u:p@ss@host/v1?x=a@b") == "http://***@host/v1?x=a@b"  # the last @ ends userinfo
    assert redact_url("http://host/v1") == "http://host/v1"
    cfg = load_config(None, ["harvest.teachers.0.base_url=http://alice:sk-URL-ONLY-9876@api.example.com/v1"])
    text = to_yaml(cfg, "imitate harvest x --base-url http://alice:sk-URL-ONLY-9876@api.example.com/v1")
    assert "sk-URL-ONLY-9876" not in text and "alice" not in text
    assert "http://***@api.example.com/v1" in text


def test_command_lines_are_redacted(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-env-key-5555")
    cfg = load_config(None, ["harvest.teachers.0.api_key_env=MY_KEY"])
    argv = [
        "harvest", "q.jsonl", "--base-url", "http://u:sk-in-url-1111@h/v1",
        "--set", "harvest.teachers.0.api_key=sk-set-2222", "--set=prices.x.secret=s3cr3t",
        "--set", "harvest.budget.max_tokens=5", "--model", "sk-env-key-5555",
    ]  # fmt: skip
    command = redact_command(cfg, argv)
    for secret in ("sk-in-url-1111", "sk-set-2222", "s3cr3t", "sk-env-key-5555"):
        assert secret not in command
    assert command.startswith("imitate harvest q.jsonl --base-url http://***@h/v1 ")
    assert "harvest.teachers.0.api_key=***" in command and "harvest.budget.max_tokens=5" in command
    assert redact_text("token=abc password=hunter2 max_tokens=7") == "token=*** password=*** max_tokens=7"


def test_every_shipped_yaml_config_loads():
    configs = sorted((REPO / "configs").glob("*.yaml")) if (REPO / "configs").exists() else []
    configs += sorted((REPO / "data" / "samples").glob("*.config.yaml"))
    assert configs, "ship at least one example config"
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# imitate "), f"{path}: first line must be the command that runs it"
        load_config(path)


def test_env_is_untouched():
    assert "IMITATE_TEST_KEY" not in os.environ
