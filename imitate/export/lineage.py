"""Where an exported record set came from: the chain of imitate manifests behind it, and the secrets to keep out.

Every stage writes a `manifest.json` next to its output: harvest (`imitate/harvest/run.py`), import, curate, mix
and self-instruct generation. `find_manifests(src)` starts at the set being exported and follows the inputs each
manifest records (any `input`/`inputs`/`path`/`source`/`sources` value naming a local folder or file), so an
export of a mix of a curated harvest finds all three. Manifests are read generically: the card shows what each
one holds, without a schema per stage; only the harvest's (known, stable) layout gets a summary of its own.

Secrets: `known_secrets()` gathers the values that must appear in no exported byte: each API key named by an
`api_key_env` in a stamped config, the Hugging Face token, and any environment variable whose name says it
holds a key, token, secret or password. `scrub` removes them from any JSON-like value (with `imitate.config`'s
redaction of secret-looking keys and URL credentials).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from imitate.config import redact

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
_INPUT_KEYS = {"input", "inputs", "path", "paths", "source", "sources", "in"}
_SECRET_ENV = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSW)", re.IGNORECASE)
_NOT_A_SECRET_ENV = re.compile(r"(_PATH|_FILE|_DIR|_URL|_ENDPOINT)$", re.IGNORECASE)
_COUNT_KEY = re.compile(r"(drop|gate|reason|fail|skip|reject|filter|remov|dedup|duplicate|truncat|refus)", re.I)
_SETTING_KEY = re.compile(
    r"(dedup|minhash|lsh|near_?dup|shingle|num_perm|threshold|rouge|similar|erase|select|top_?k|max_per|diversity)",
    re.IGNORECASE,
)
_NOT_COUNTS = {"config", "settings", "params", "teachers", "sets"}  # configuration and snapshots, not counts


@dataclass
class Stage:
    """One manifest of the chain: its folder, its kind, its content, and the sha256 of its stamped config."""

    dir: Path
    kind: str
    manifest: dict[str, Any]
    config_sha256: str | None


def stage_kind(manifest: dict[str, Any]) -> str:
    if isinstance(manifest.get("kind"), str):
        return manifest["kind"]
    if "totals" in manifest and "teachers" in manifest:
        return "harvest"
    words = str(manifest.get("command", "")).split()
    if len(words) > 2 and words[:2] in (["imitate", "generate"], ["imitate", "import"]):
        return f"{words[1]} {words[2]}"  # `imitate generate self-instruct`, `imitate import sharegpt`
    return words[1] if len(words) > 1 and words[0] == "imitate" else "unknown"


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # Only an imitate manifest: a foreign folder may hold an unrelated manifest.json.
    if isinstance(data, dict) and ("imitate_version" in data or "kind" in data):
        return data
    return None


def _inputs(obj: Any, key: str = "") -> Iterator[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k != "config":
                yield from _inputs(v, k)
    elif isinstance(obj, list):
        for v in obj:
            yield from _inputs(v, key)
    elif isinstance(obj, str) and key in _INPUT_KEYS:
        yield obj


def _resolve(text: str, near: Path) -> Path | None:
    for base in (Path.cwd(), near):
        path = (base / Path(text).expanduser()).resolve()
        if path.is_dir():
            return path
        if path.is_file():
            return path.parent
    return None


def find_manifests(src: Path, limit: int = 32) -> list[Stage]:
    """The manifests behind `src` (a folder or file), nearest first, each folder once: the inputs each one
    records, and the stages a stage ran inside its own folder (self-instruct's generate/ and answer/ harvests).
    Earlier exports are not stages of the data."""
    start = (src if src.is_dir() else src.parent).resolve()
    queue, seen, out = [start], set(), []
    while queue and len(out) < limit:
        folder = queue.pop(0)
        if folder in seen:
            continue
        seen.add(folder)
        manifest = _read_manifest(folder)
        if manifest is None or stage_kind(manifest) == "export":
            continue
        config = folder / CONFIG
        digest = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
        out.append(Stage(folder, stage_kind(manifest), manifest, digest))
        inner = sorted(p for p in folder.iterdir() if p.is_dir() and (p / MANIFEST).is_file())
        found = [_resolve(text, folder) for text in _inputs(manifest)]
        queue += [f for f in [*inner, *found] if f is not None and f not in seen]
    return out


def _walk(obj: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, (*path, str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, (*path, str(i)))
    else:
        yield path, obj


def drop_counts(stage: Stage) -> dict[str, int]:
    """`{"gate or reason": count}` of one stage. Read generically: every non-zero integer whose own key, or the
    key of the table it sits in, names a drop, gate, reason, failure, skip, filter, duplicate... Configuration
    (settings, config, params) and per-teacher or per-set snapshots are not counts."""
    m = stage.manifest
    if stage.kind == "harvest":  # known layout: the totals over every run, not the last run's
        t = m.get("totals", {})
        out = {f"failed: {cls}": n for cls, n in sorted(t.get("failed_by_class", {}).items()) if n}
        for key in ("retry_next_run", "pending"):
            if t.get(key):
                out[key] = t[key]
        if m.get("this_run", {}).get("skipped_bad_input_rows"):
            out["skipped_bad_input_rows (last run)"] = m["this_run"]["skipped_bad_input_rows"]
        return out
    return {".".join(path): value for path, value in _walk(m) if value and _is_count(path, value)}


def _is_count(path: tuple[str, ...], value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int) or _NOT_COUNTS & set(path):
        return False
    return bool(_COUNT_KEY.search(path[-1]) or (len(path) > 1 and _COUNT_KEY.search(path[-2])))


def settings(stage: Stage) -> dict[str, Any]:
    """Dedup, similarity, selection and erasure settings of one stage: the set values (not None or False) whose
    key path names one, outside the counts and the harvest's totals."""
    out = {}
    for path, value in _walk(stage.manifest):
        key = ".".join(path)
        if not path or value is None or value is False or _is_count(path, value) or path[0] in ("totals", "this_run"):
            continue
        if set(path) & {"config", "teachers", "sets"}:
            continue
        if any(_SETTING_KEY.search(p) for p in path):
            out[key] = value
    return out


def teacher_api_key_envs(stages: list[Stage]) -> set[str]:
    """Every `api_key_env` named in the stages' manifests and stamped configs."""
    names: set[str] = set()
    for stage in stages:
        trees: list[Any] = [stage.manifest]
        config = stage.dir / CONFIG
        if config.is_file():
            with contextlib.suppress(OSError, yaml.YAMLError):  # a damaged config only loses its key names
                trees.append(yaml.safe_load(config.read_text(encoding="utf-8")))
        for tree in trees:
            names |= {v for p, v in _walk(tree) if p and p[-1] == "api_key_env" and isinstance(v, str) and v}
    return names


def known_secrets(stages: list[Stage], extra: list[str] | None = None) -> list[str]:
    """Values that must not appear in any exported file, longest first (so a key containing another goes whole)."""
    values = {os.environ.get(name, "") for name in teacher_api_key_envs(stages)}
    for name, value in os.environ.items():
        if _SECRET_ENV.search(name) and not _NOT_A_SECRET_ENV.search(name):
            values.add(value)
    values |= set(extra or [])
    return sorted((v for v in values if len(v) >= 8), key=len, reverse=True)


def scrub(obj: Any, secrets: list[str]) -> Any:
    """`imitate.config.redact` (secret-looking keys, URL credentials, known values) over JSON-like data."""
    return redact(obj, secrets)


def scrub_values(obj: Any, secrets: list[str]) -> Any:
    """Only the known secret values masked, nothing else touched: for the data rows, where an answer's
    `api_key=...` in a code sample is content, not a credential of ours."""
    if isinstance(obj, str):
        for s in secrets:
            if s in obj:
                obj = obj.replace(s, "***")
        return obj
    if isinstance(obj, dict):
        return {k: scrub_values(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_values(v, secrets) for v in obj]
    return obj
