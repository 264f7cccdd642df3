"""The shipped system-message library: pinned hashes, presets, deterministic per-query sampling."""

from __future__ import annotations

import inspect
import shutil
from collections import Counter
from pathlib import Path

import pytest

from imitate.config import HarvestConfig
from imitate.errors import ConfigError
from imitate.harvest.plan import Planner
from imitate.prompts import PROMPTS_DIR_ENV, SystemMessageSampler, default_prompts_dir, load_library
from imitate.records import Query, sha256_text

# Editing a shipped prompt must fail here until the pin is bumped on purpose (records store these hashes).
PINNED = {
    1: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    2: "26e1dfe0e8d5476fca566e0751d3055b7de5113106b39a38cefc9a5eedd42d74",
    3: "19e9df8746c49199b0fa311110af4a2ac98b6014fbcc4dd0b21882fb629fd1d7",
    4: "8da8fa6c856a62b53b6dc1982384c61e3dd8c46d46792fb2074fd0c1f274ab65",
    5: "4ded809de19d18ebaa9415a0b2112fab129317a15660cbfb3efcfbf462329671",
    6: "e4ce82d32bbffbc3c137cc57cbd3fe0d2dd69a6924095f2c283657eb62277443",
    7: "f423ba1c506c7703f3b0d1cde759c13f13b8f0f6bd4b28c76acca7b7ccf87942",
    8: "98a520c80984a82df46f3657bba8785b099c7d5f619ef0fa93fd0cff678124f0",
    9: "42ddfe8abcfda770dba6d2a9053abc90499c53429097083f40fbcb039ddbc4fb",
    10: "f29f41dda721c1569f61e68df39bf80d6f9dea7f8485c26298ef8187dace70a7",
    11: "7d31188930065fa70e0627d4a0d0b20df0463162e807b699441b8aab3d235c1b",
    12: "ffad727983848bee0a0b5cfdffffabd7a456946ccd779733b63a98ebfc5425ad",
    13: "9da670181a10490c046a4740e65916dba9c0c13666666b9cad03ff6f9b53c2e0",
    14: "3446b9e2f8c2ef7db5a0dc61dfdf355f4e079c02c19e2a2f13ab1c4d689daedc",
    15: "5e8227f7a0b29a80ff1160b109a95995c32f4a9f4ea8560533ab5846789a2153",
    16: "2f361bc12c27d9043c9c451458bb1a0056e04456f3187ba60408461e5cbf0329",
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
    f.write_text(f.read_text().replace("one step at a time", "in one go"))
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
    # Pinned draws: a change here changes request keys, and a resumed harvest would buy its answers again.
    orca = SystemMessageSampler(lib, "orca", seed=7)
    assert [orca.sample(q(f"q{i}"))[0] for i in range(12)] == [
        "11", "16", "16", "11", "11", "16", "16", "6", "11", "6", "16", "16"
    ]  # fmt: skip


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


def test_every_sample_of_a_query_gets_the_same_system_message(lib):
    """Rejection sampling compares the n answers to one prompt: the n requests differ only in sample_index (the
    sampler has no per-sample draw that a caller could vary by mistake)."""
    assert list(inspect.signature(SystemMessageSampler.sample).parameters) == ["self", "query"]
    sampler = SystemMessageSampler(lib, "orca", seed=3)
    planner = Planner(HarvestConfig(samples_per_prompt=4), sampler.sample)
    chosen = set()
    for i in range(100):
        requests = [p.request for p in planner.plan(q(i, collection="niv2"))]
        assert [r.sample_index for r in requests] == [0, 1, 2, 3]
        assert len({(r.system_prompt_id, r.system_prompt_sha256, r.messages[0].content) for r in requests}) == 1
        assert len({r.key() for r in requests}) == 4
        chosen.add(requests[0].system_prompt_id)
    assert len(chosen) > 3  # queries still get different messages from each other
