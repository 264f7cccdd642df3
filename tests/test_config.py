"""Typed config: layering, every problem reported with its key path, secrets never printed or written."""

import os
from pathlib import Path

import pytest

from imitate.config import load_config, redact, resolve_api_key, stamp, to_yaml
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
