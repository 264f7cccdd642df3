"""The shipped system-message library: pinned hashes, presets, deterministic per-query sampling."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from imitate.errors import ConfigError
from imitate.prompts import PROMPTS_DIR_ENV, SystemMessageSampler, default_prompts_dir, load_library
from imitate.records import Query, sha256_text

# Editing a shipped prompt must fail here until the pin is bumped on purpose (records store these hashes).
PINNED = {
    1: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    2: "877b588c8582544a5af5e1b79b70283f41a22967345d19fd9470d2e06f48cc8f",
    3: "11ed3c47643096f82da661766b7687ce2a0ceb5b344fffdd2117d2a1ad9a9d25",
    4: "8da8fa6c856a62b53b6dc1982384c61e3dd8c46d46792fb2074fd0c1f274ab65",
    5: "9d2fd53f5082b7c29480a96de68069f73aa3608dd850f0cebdda6474bbb4a034",
    6: "eb4471e613e1a657d0feb9f64d41c357f6d2999d3ab5e0131c04424cb10940e1",
    7: "a5a96c0e5b722357b8f4e9832c76d350e6d533c8cf72899ddaead426f9410f28",
    8: "5c82f38e6b41568621d334395630f4f9c48ff3bb0a0a5bf3a9915199389c9682",
    9: "9586fc2a0594eac5cc0051542791f45e19c506ee696c0d3f01745fbe56223fb1",
    10: "eb71a2e4d57deabf5f05e0ba06beda3919987befe2d62097193475fc48d5aa3c",
    11: "91441bcaaf87a272d17e27fa14c2d412477f75d6a97d463cd54445e315cbad84",
    12: "85eb304e94bc201edfb08bfe2053cd70b1bb7d73d311c2c9ac8f235c8accdcb8",
    13: "717c1f409c3182507246feb5fd89f0faf447726175e5b7d93f0c98ab0f69a2e6",
    14: "a713f97189417973a6c85bd26ec86de4daa1934a86881716dfce7624de663da8",
    15: "37313eafb4bd27f1b64d5684875c46e2ab798af752c04bd3e5ba6464e9fb64db",
    16: "0f492820bf4c5fc2e7e2fb4601a2ce6689f8265887b5003c44843b73be16013d",
}
ORCA_IDS = {
    "orca-cot": {6, 11, 16},
    "orca-niv2": {1, 2, 5, 7, 9, 12, 13, 14, 15},
    "orca-t0": {1, 2, 3, 5, 7},
    "orca-flan": {3, 4, 7, 8, 10, 13, 14, 15, 16},
}


@pytest.fixture(scope="module")
def lib():
    return load_library()


def q(i: int | str, **kw) -> Query:
    return Query(id=str(i), question="What is 2 + 2?", **kw)


def test_shipped_prompts_are_pinned(lib):
    assert {i: p.sha256 for i, p in lib.prompts.items()} == PINNED
    assert len(lib.prompts) == 16
    assert lib.prompts[1].text == ""
    assert all(p.text.strip() for i, p in lib.prompts.items() if i != 1)
    assert len({p.text for p in lib.prompts.values()}) == 16


def test_presets_follow_the_paper(lib):
    for name, ids in ORCA_IDS.items():
        assert set(lib.presets[name].weights) == ids
    assert lib.presets["none"].weights == {}
    assert lib.presets["orca"].routes["niv2"] == "orca-niv2"


def test_default_dir_and_env_override(monkeypatch, tmp_path):
    assert (default_prompts_dir() / "presets.yaml").is_file()
    monkeypatch.setenv(PROMPTS_DIR_ENV, str(tmp_path))
    assert default_prompts_dir() == tmp_path
    with pytest.raises(ConfigError, match="not a prompts folder"):
        load_library()


@pytest.fixture
def copy_dir(tmp_path):
    shutil.copytree(default_prompts_dir(), tmp_path / "p")
    return tmp_path / "p"


def test_edited_text_fails_naming_the_file(copy_dir):
    f = copy_dir / "system" / "orca-07.yaml"
    f.write_text(f.read_text().replace("step by step", "in one go"))
    with pytest.raises(ConfigError, match=r"orca-07\.yaml: sha256 does not match"):
        load_library(copy_dir)


def test_duplicate_id_unknown_key_and_bad_preset_all_reported(copy_dir):
    (copy_dir / "system" / "zz-dup.yaml").write_text((copy_dir / "system" / "orca-02.yaml").read_text())
    f = copy_dir / "system" / "orca-03.yaml"
    f.write_text(f.read_text() + "author: me\n")
    with pytest.raises(ConfigError) as err:
        load_library(copy_dir)
    text = err.value.message
    assert "zz-dup.yaml: id 2 already used" in text and "orca-03.yaml: author: Extra inputs" in text

    shutil.rmtree(copy_dir / "system")
    shutil.copytree(default_prompts_dir() / "system", copy_dir / "system")
    (copy_dir / "presets.yaml").write_text("version: 1\npresets:\n  x: {weights: {99: 1}}\n")
    with pytest.raises(ConfigError, match="preset x: unknown system message id 99"):
        load_library(copy_dir)


def test_sampling_is_deterministic_per_query_and_order_free(lib):
    a = SystemMessageSampler(lib, "orca-niv2", seed=7)
    b = SystemMessageSampler(lib, "orca-niv2", seed=7)
    ids = [f"q{i}" for i in range(300)]
    first = {i: a.sample(q(i)) for i in ids}
    assert {i: b.sample(q(i)) for i in reversed(ids)} == first
    other = SystemMessageSampler(lib, "orca-niv2", seed=8)
    assert [other.sample(q(i)) for i in ids] != list(first.values())
    assert a.sample(q("q1"), sample_index=0) == first["q1"]


def test_row_system_wins_and_empty_means_no_turn(lib):
    s = SystemMessageSampler(lib, "orca-cot")
    assert s.sample(q(1, system="Be terse.")) == ("row", sha256_text("Be terse."), "Be terse.")
    assert s.sample(q(1, system="")) == ("row", sha256_text(""), None)
    only_empty = SystemMessageSampler(lib, "orca-t0", weights={1: 1, 2: 0, 3: 0, 5: 0, 7: 0})
    assert only_empty.sample(q(1)) == ("1", sha256_text(""), None)
    assert q(1).messages(None)[0].role == "user"
    assert SystemMessageSampler(lib, "none").sample(q(1)) == (None, None, None)


def test_routing_by_collection(lib):
    s = SystemMessageSampler(lib, "orca")
    assert s.table_for("CoT") == "orca-cot" and s.table_for("niv2") == "orca-niv2"
    assert s.table_for(None) == "orca-cot" and s.table_for("mystery") == "orca-cot"
    for i in range(200):
        pid, _, _ = s.sample(q(i, collection="flan2021"))
        assert int(pid) in ORCA_IDS["orca-flan"]


def test_distribution_follows_weights(lib):
    s = SystemMessageSampler(lib, "orca-cot", weights={"6": 1, 11: 2, 16: 1}, seed=3)
    n = 8_000
    counts = Counter(s.sample(q(i))[0] for i in range(n))
    for pid, share in {"6": 0.25, "11": 0.5, "16": 0.25}.items():
        assert abs(counts[pid] / n - share) < 0.02  # > 3.5 sigma


@pytest.mark.parametrize(
    ("weights", "match"),
    [({99: 1}, "unknown system message id 99"), ({4: 1}, "never uses"), ({6: -1}, ">= 0"), ({"x": 1}, "not a")],
)
def test_bad_weights(lib, weights, match):
    with pytest.raises(ConfigError, match=match):
        SystemMessageSampler(lib, "orca-cot", weights=weights)


def test_unknown_preset(lib):
    with pytest.raises(ConfigError, match="unknown system-message preset"):
        SystemMessageSampler(lib, "orca-nope")


def test_every_prompt_file_is_named_after_its_id(lib):
    names = sorted(p.name for p in (default_prompts_dir() / "system").glob("*.yaml"))
    assert names == [f"orca-{i:02d}.yaml" for i in sorted(lib.prompts)]
    assert Path(default_prompts_dir()).name == "prompts"
