"""The versioned system-message library (`prompts/`) and the pure, per-query deterministic sampler.

    prompts/system/orca-NN.yaml   one system message each: id, version, description, sha256, text
    prompts/presets.yaml          sampling presets: allowed ids + weights, or routes by Query.collection

`load_library()` validates every file (unknown keys, sha256 of each text, unique ids, presets naming known
ids) and reports every problem at once as one `ConfigError`. The folder is the repository's top-level
`prompts/` (the package is installed editable) unless `IMITATE_PROMPTS_DIR` points elsewhere.

`SystemMessageSampler.sample(query)` returns `(prompt_id, sha256, text)`:
- a query's own `system` wins: `("row", sha256(system), system or None)`;
- preset `none`: `(None, None, None)`;
- otherwise a message drawn by weight with a draw derived only from `(seed, query.id)`, so the choice does not
  depend on order or concurrency and a resumed run rebuilds the same request key.
With `samples_per_prompt > 1` every sample of a query gets this one message: rejection sampling compares the n
answers to the same prompt, so only the teacher's sampling may differ between them, not the instructions.
An empty message (id 1) comes back as `("1", sha256(""), None)`: recorded, but no system turn is sent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imitate.errors import ConfigError
from imitate.records import Query, sha256_text, unit_hash

M = TypeVar("M", bound=BaseModel)

PROMPTS_DIR_ENV = "IMITATE_PROMPTS_DIR"
ROW_PROMPT_ID = "row"
_HEX64 = r"^[0-9a-f]{64}$"

Choice = tuple[str | None, str | None, str | None]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SystemPrompt(_Model):
    id: int = Field(ge=1)
    version: int = Field(ge=1)
    description: str
    sha256: str = Field(pattern=_HEX64)
    text: str


class Preset(_Model):
    """Either `weights` (allowed id → weight; empty = no system message) or `routes` (collection → preset)."""

    description: str = ""
    weights: dict[int, float] = Field(default_factory=dict)
    routes: dict[str, str] = Field(default_factory=dict)
    default: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> Preset:
        if self.routes and self.weights:
            raise ValueError("a preset has either weights or routes, not both")
        if self.routes and not self.default:
            raise ValueError("a routing preset needs a default preset for other collections")
        if self.default and not self.routes:
            raise ValueError("default only makes sense with routes")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError("weights must be >= 0")
        if self.weights and sum(self.weights.values()) <= 0:
            raise ValueError("at least one weight must be > 0")
        return self


class _PresetFile(_Model):
    version: int = Field(ge=1)
    presets: dict[str, Preset]


class PromptLibrary(_Model):
    prompts: dict[int, SystemPrompt]
    presets: dict[str, Preset]

    @model_validator(mode="after")
    def _consistent(self) -> PromptLibrary:
        problems = []
        for name, p in self.presets.items():
            problems += [f"preset {name}: unknown system message id {i}" for i in p.weights if i not in self.prompts]
            for target in [*p.routes.values(), *([p.default] if p.default else [])]:
                if target not in self.presets:
                    problems.append(f"preset {name}: routes to unknown preset {target!r}")
                elif self.presets[target].routes:
                    problems.append(f"preset {name}: routes to {target!r}, which routes again")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def preset(self, name: str) -> Preset:
        if name not in self.presets:
            raise ConfigError(f"unknown system-message preset {name!r}", hint=f"known: {', '.join(self.presets)}")
        return self.presets[name]


# ---------------------------------------------------------------------------------------------- loading


def default_prompts_dir() -> Path:
    env = os.environ.get(PROMPTS_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "prompts"


def read_yaml(path: Path) -> Any:
    """A prompts-folder YAML file's data; ConfigError naming the file (and line) when it cannot be read or parsed."""
    problems: list[str] = []
    data = _read(path, problems)
    if problems:
        raise ConfigError(problems[0])
    return data


def load_model(path: Path, model: type[M]) -> M:
    """A versioned prompts file read and validated as `model`: ConfigError lists every shape problem at once (the
    caller then checks its sha256 fields, which differ per file)."""
    try:
        return model.model_validate(read_yaml(path))
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{path} has {len(problems)} problem(s)", problems=problems) from exc


def _read(path: Path, problems: list[str]) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"{path}: cannot read ({exc.strerror})")
    except UnicodeDecodeError:
        problems.append(f"{path}: not UTF-8 text")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problems.append(f"{where}: invalid YAML ({getattr(exc, 'problem', None) or exc})")
    return None


def _errors(path: Path, exc: ValidationError) -> list[str]:
    return [f"{path}: {'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors()]


def _load_prompts(system_dir: Path, problems: list[str]) -> dict[int, SystemPrompt]:
    prompts: dict[int, SystemPrompt] = {}
    seen: dict[int, Path] = {}
    for path in sorted(system_dir.glob("*.yaml")):
        data = _read(path, problems)
        try:
            p = SystemPrompt.model_validate(data)
        except ValidationError as exc:
            problems += _errors(path, exc)
            continue
        if sha256_text(p.text) != p.sha256:
            problems.append(
                f"{path}: sha256 does not match text (text hashes to {sha256_text(p.text)}); "
                "an edited prompt needs a new sha256 and a version bump"
            )
        if p.id in seen:
            problems.append(f"{path}: id {p.id} already used by {seen[p.id]}")
            continue
        seen[p.id] = path
        prompts[p.id] = p
    if not seen and not problems:
        problems.append(f"{system_dir}: no system messages (*.yaml) found")
    return prompts


def load_library(dir: Path | str | None = None) -> PromptLibrary:
    """Load and validate `dir` (default: `default_prompts_dir()`); ConfigError lists every problem."""
    root = Path(dir) if dir is not None else default_prompts_dir()
    if not (root / "system").is_dir():
        raise ConfigError(f"{root}: not a prompts folder (no system/ inside)", hint=f"set {PROMPTS_DIR_ENV}")
    problems: list[str] = []
    prompts = _load_prompts(root / "system", problems)
    presets_path = root / "presets.yaml"
    presets: dict[str, Preset] = {}
    data = _read(presets_path, problems)
    if data is not None or presets_path.exists():
        try:
            presets = _PresetFile.model_validate(data).presets
        except ValidationError as exc:
            problems += _errors(presets_path, exc)
    if problems:
        raise ConfigError(f"prompt library {root} has {len(problems)} problem(s)", problems=problems)
    try:
        return PromptLibrary(prompts=prompts, presets=presets)
    except ValidationError as exc:
        raise ConfigError(
            f"prompt library {root} is inconsistent", problems=[str(e["msg"]) for e in exc.errors()]
        ) from exc


# ---------------------------------------------------------------------------------------------- sampling


def _parse_weights(weights: Mapping[int | str, float], library: PromptLibrary) -> dict[int, float]:
    out, problems = {}, []
    for key, w in weights.items():
        try:
            pid = int(key)
        except (TypeError, ValueError):
            problems.append(f"{key!r} is not a system-message id")
            continue
        if pid not in library.prompts:
            problems.append(f"unknown system message id {pid}")
        elif not w >= 0:
            problems.append(f"weight for id {pid} must be >= 0, got {w}")
        else:
            out[pid] = float(w)
    if problems:
        raise ConfigError("bad system-message weights", problems=problems)
    return out


class _Table:
    """Cumulative weights of one weights-preset (empty: no system message)."""

    def __init__(self, name: str, preset: Preset, overrides: dict[int, float]):
        weights = {i: overrides.get(i, w) for i, w in sorted(preset.weights.items())}
        if preset.weights and sum(weights.values()) <= 0:
            raise ConfigError(f"preset {name}: every weight is 0 after the overrides")
        self.ids = [i for i, w in weights.items() if w > 0]
        total, self.cumulative = sum(weights.values()), []
        acc = 0.0
        for i in self.ids:
            acc += weights[i] / total
            self.cumulative.append(acc)

    def pick(self, u: float) -> int | None:
        for pid, edge in zip(self.ids, self.cumulative, strict=True):
            if u < edge:
                return pid
        return self.ids[-1] if self.ids else None


class SystemMessageSampler:
    """Pure and deterministic: the choice for a query depends only on (seed, preset, weights, query)."""

    def __init__(
        self,
        library: PromptLibrary,
        preset: str,
        weights: Mapping[int | str, float] | None = None,
        seed: int = 0,
    ):
        self.library, self.seed, self.preset_name = library, seed, preset
        top = library.preset(preset)
        overrides = _parse_weights(weights or {}, library)
        names = sorted({*top.routes.values(), top.default}) if top.routes else [preset]
        allowed = {i for n in names for i in library.presets[n].weights}
        stray = sorted(set(overrides) - allowed)
        if stray:
            raise ConfigError(
                f"weights name ids that preset {preset!r} never uses: {stray}", hint=f"allowed: {sorted(allowed)}"
            )
        self._tables = {n: _Table(n, library.presets[n], overrides) for n in names}
        self._routes = {k.strip().lower(): v for k, v in top.routes.items()}
        self._default = top.default or preset

    def table_for(self, collection: str | None) -> str:
        """The weights-preset used for a collection (routing presets pick one; others are themselves)."""
        return self._routes.get((collection or "").strip().lower(), self._default)

    def sample(self, query: Query) -> Choice:
        if query.system is not None:
            return ROW_PROMPT_ID, sha256_text(query.system), query.system or None
        # The trailing 0 was a per-sample index that was never varied; kept so earlier harvests draw the same
        # messages, and so build the same request keys on resume.
        pid = self._tables[self.table_for(query.collection)].pick(unit_hash("system", self.seed, query.id, 0))
        if pid is None:
            return None, None, None
        p = self.library.prompts[pid]
        return str(p.id), p.sha256, p.text or None

    __call__ = sample
