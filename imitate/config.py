"""Typed configuration: defaults < YAML file < `--set key.path=value` overrides, validated all at once.

Every model forbids unknown keys. Secrets never live in a config: a teacher names the *environment variable*
holding its API key (`api_key_env`), and `resolve_api_key` reads it at the moment a client is built. Whatever is
printed or written (`redacted`, `stamp`) passes through redaction anyway, so a key pasted into a URL or a
metadata field does not leak either.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from imitate.dataset.curate_config import CurateConfig
from imitate.errors import ConfigError
from imitate.records import GenerationParams

REDACTED = "***"
_SECRET_KEY = re.compile(r"(api_?key|secret|password|passwd|token|authorization)$", re.IGNORECASE)
# Userinfo runs to the *last* @ before the path (`user:p@ss@host`), as URL parsers read it; stopping at the first
# @ would leave the rest of such a password in the text.
_URL_USERINFO = re.compile(r"(?<=://)[^/?#\s]*@")
# `--set harvest.teachers.0.api_key=sk-...` in a command line: the value of a secret-looking dotted key.
_SECRET_ASSIGNMENT = re.compile(
    r"(?<![\w.-])([\w.-]*?(?:api_?key|secret|password|passwd|token|authorization))=(\S+)", re.IGNORECASE
)


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Price(_Cfg):
    """USD per million tokens."""

    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)
    batch_multiplier: float = Field(0.5, ge=0, description="Batch API price as a fraction of the online price")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


def check_base_url(url: str) -> str:
    """An http(s) URL with a host and a port in range, checked when the config loads: a typo in it is one
    ConfigError before any work, not a traceback (or a per-row failure) from the HTTP client later."""
    shown = redact_url(url)  # the message is printed: credentials in the URL must not be
    try:
        parts = urlsplit(url)
        port = parts.port  # parsing the port is what rejects 99999 and non-numbers
    except ValueError as exc:
        raise ValueError(f"{shown!r} is not a valid URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{shown!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{shown!r} has no host")
    if port == 0:
        raise ValueError(f"{shown!r}: port 0 cannot be connected to")
    return url


class TeacherConfig(_Cfg):
    name: str = "default"
    base_url: Annotated[str, AfterValidator(check_base_url)] = "http://127.0.0.1:8089/v1"
    base_urls: list[Annotated[str, AfterValidator(check_base_url)]] | None = Field(
        None,
        description="a fleet: replicas of one self-hosted teacher (vLLM, llama.cpp, imitate serve), instead of "
        "base_url; each attempt goes to the replica with the fewest outstanding, rpm/tpm/max_concurrency apply "
        "to each replica (imitate/harvest/fleet.py)",
    )
    identity: Annotated[str, AfterValidator(check_base_url)] | None = Field(
        None,
        description="the URL the cache/resume key names this teacher by; None = base_url (for a fleet, the first "
        "of base_urls). Set it to the old first URL when that server leaves the fleet, so a rerun re-buys nothing",
    )
    model: str = "fake-teacher"
    api_key_env: str | None = Field(
        None, description="name of the environment variable holding the API key (never the key itself)"
    )
    rpm: int | None = Field(None, ge=1, description="requests per minute; None = learn from headers/errors")
    tpm: int | None = Field(None, ge=1, description="tokens per minute; None = learn from headers/errors")
    max_concurrency: int = Field(256, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    weight: float = Field(1.0, ge=0)
    collections: list[str] | None = Field(None, description="only these collections go to this teacher")
    subset_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="send a copy of this share of queries (chosen by id hash) here, besides the main route",
    )
    fallback: bool = Field(False, description="only used when the routed teacher is out of quota or down")
    transport: Literal["aiohttp", "sdk"] = Field(
        "aiohttp",
        description="how chat requests are sent: aiohttp (fast, the default) or sdk = the openai SDK, for setups "
        "only the SDK handles (README, 'Transports')",
    )
    ca_bundle: str | None = Field(
        None, description="extra CA certificates (PEM file or directory) to trust, besides the system's"
    )
    max_response_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="cap on one decoded chat answer; a longer one fails its row"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_way_to_name_servers(cls, data: Any) -> Any:
        """`base_url` or `base_urls`, not both; a fleet's `base_url` becomes its first replica (what code reading
        one endpoint, and the cache key, see). A stamped config carries both, equal: that reloads."""
        if not isinstance(data, dict) or data.get("base_urls") is None:
            return data
        urls = data["base_urls"]
        if isinstance(urls, list) and not urls:
            raise ValueError("base_urls is empty: list one server URL or more (or give base_url)")
        first = urls[0] if isinstance(urls, list) else None
        if "base_url" in data and data["base_url"] != first:
            raise ValueError("give base_url (one server) or base_urls (a fleet), not both")
        with contextlib.suppress(ValueError):  # a bad first URL is reported once, as base_urls.0
            data = {**data, "base_url": check_base_url(first)} if isinstance(first, str) else data
        return data

    @model_validator(mode="after")
    def _distinct_replicas(self) -> TeacherConfig:
        seen: dict[str, int] = {}
        for i, url in enumerate(self.base_urls or []):
            j = seen.setdefault(url.rstrip("/"), i)
            if j != i:  # one server twice would get twice its share and have its limits counted twice
                raise ValueError(f"base_urls.{i} repeats base_urls.{j} ({redact_url(url)})")
        return self

    @property
    def replicas(self) -> list[str]:
        """The servers requests go to: base_urls, or base_url alone."""
        return list(self.base_urls) if self.base_urls else [self.base_url]

    @property
    def key_url(self) -> str:
        """What the cache/resume key names this teacher by, whichever replica answers."""
        return self.identity or self.base_url


class FieldMap(_Cfg):
    """Which input column holds what."""

    question: str = "question"
    system: str | None = "system"
    id: str | None = "id"
    collection: str | None = "collection"


class SourceConfig(_Cfg):
    fields: FieldMap = Field(default_factory=FieldMap)
    format: Literal["auto", "jsonl", "csv", "parquet", "hf-disk", "hub"] = "auto"
    split: str = "train"
    subset: str | None = Field(None, description="Hub dataset configuration name (the `name` of load_dataset)")
    skip_bad_rows: bool = False
    limit: int | None = Field(None, ge=1)


class BudgetConfig(_Cfg):
    max_usd: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, ge=1)
    max_requests: int | None = Field(None, ge=1)


class RetryConfig(_Cfg):
    max_attempts: int = Field(6, ge=1)
    base_delay_s: float = Field(0.5, ge=0)
    max_delay_s: float = Field(60.0, ge=0)
    reask_truncated: int = Field(0, ge=0, description="re-ask a truncated answer this many times, doubling max_tokens")
    down_after: int = Field(
        16, ge=1, description="failed attempts in a row (no connection, 5xx, timeout) after which a teacher is down"
    )
    down_after_s: float = Field(
        60.0, ge=0, description="for a teacher that has answered before: also this long without an answer"
    )
    replica_out_after: int = Field(
        3, ge=1, description="a fleet's replica failing this many attempts in a row (refused, 5xx...) is taken out"
    )
    replica_backoff_s: float = Field(
        2.0, ge=0, description="how long a failing replica stays out; doubled per failed return, up to max_delay_s"
    )


class HarvestConfig(_Cfg):
    teachers: list[TeacherConfig] = Field(default_factory=lambda: [TeacherConfig()])
    params: GenerationParams = Field(default_factory=GenerationParams)
    preset: str = "orca"
    preset_weights: dict[str, float] | None = None
    seed: int = 0
    samples_per_prompt: int = Field(1, ge=1)
    source: SourceConfig = Field(default_factory=SourceConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    mode: Literal["online", "batch"] = "online"
    shard_rows: int = Field(50_000, ge=1)
    fsync_every: int = Field(64, ge=1, description="rows between fsyncs of the journal")
    drain_timeout_s: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _unique_teachers(self) -> HarvestConfig:
        names = [t.name for t in self.teachers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"teacher names must be unique, repeated: {', '.join(dupes)}")
        if not self.teachers:
            raise ValueError("at least one teacher is needed")
        fleets = [t.name for t in self.teachers if len(t.replicas) > 1]
        if self.mode == "batch" and fleets:
            raise ValueError(
                f"mode=batch sends each teacher's requests to one Batch API; teacher {fleets[0]!r} lists several "
                "base_urls (a fleet of self-hosted servers): use mode=online"
            )
        return self


class ImitateConfig(_Cfg):
    harvest: HarvestConfig = Field(default_factory=HarvestConfig)
    prices: dict[str, Price] = Field(default_factory=dict, description="USD per million tokens, by model name")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig())  # defined in the train section below
    curate: CurateConfig = Field(default_factory=CurateConfig)  # imitate/dataset/curate_config.py

    def price_for(self, model: str) -> Price:
        return self.prices.get(model, Price())


# ---------------------------------------------------------------------------------------------- loading


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        nxt_is_index = parts[i + 1].isdigit()
        if isinstance(node, list):
            idx = int(part)
            while len(node) <= idx:
                node.append({})
            node = node[idx]
            continue
        if part not in node or not isinstance(node[part], dict | list):
            node[part] = [] if nxt_is_index else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        while len(node) <= idx:
            node.append({})
        node[idx] = value
    else:
        node[last] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not re.fullmatch(r"[A-Za-z0-9_.\-]+", key.strip()):
            problems.append(f"--set {item!r}: expected key.path=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    if problems:
        raise ConfigError("bad override", problems=problems)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}: {problem}", hint="fix the YAML syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _format_validation(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"].removeprefix("Value error, ")  # our validators' messages read better without it
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            if path.split(".")[-1] in {"api_key", "key", "openai_api_key"}:
                msg += " (put the key in an environment variable and name it in api_key_env)"
        problems.append(f"{path}: {msg}")
    return problems


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> ImitateConfig:
    """Defaults < YAML < overrides. Raises ConfigError listing every problem with its key path."""
    tree: dict[str, Any] = _read_yaml(Path(path)) if path else {}
    for key, value in parse_overrides(overrides or []):
        _set_path(tree, key, value)
    try:
        return ImitateConfig.model_validate(tree)
    except ValidationError as exc:
        where = str(path) if path else "config"
        raise ConfigError(f"{where} has {exc.error_count()} problem(s)", problems=_format_validation(exc)) from exc


def resolve_api_key(teacher: TeacherConfig, where: str = "harvest.teachers") -> str | None:
    """Read the teacher's API key from its environment variable; a named but unset variable is an error."""
    if not teacher.api_key_env:
        return None
    value = os.environ.get(teacher.api_key_env)
    if not value:
        raise ConfigError(
            f"environment variable {teacher.api_key_env} (teacher {teacher.name!r}, {where}[].api_key_env) is not set",
            hint=f"export {teacher.api_key_env}=... or change api_key_env",
        )
    return value


# ---------------------------------------------------------------------------------------------- redaction


def _known_secrets(cfg: ImitateConfig) -> list[str]:
    out = []
    for t in cfg.harvest.teachers:
        if t.api_key_env and os.environ.get(t.api_key_env):
            out.append(os.environ[t.api_key_env])
    return [s for s in out if len(s) >= 4]


def redact_url(url: str) -> str:
    """`http://user:KEY@host/v1` -> `http://***@host/v1`: user and password both go (either may be the key)."""
    return _URL_USERINFO.sub(REDACTED + "@", url)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """Free text (a command line, a message): URL credentials, `secret.key=value` assignments and any known
    secret value masked."""
    text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m.group(1)}={REDACTED}", redact_url(text))
    for s in secrets or []:
        text = text.replace(s, REDACTED)
    return text


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """Mask secret-looking keys, URL credentials and any known secret value, recursively."""
    secrets = secrets or []
    if isinstance(obj, dict):
        return {
            k: (REDACTED if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v, secrets))
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


def redacted(cfg: ImitateConfig) -> dict[str, Any]:
    return redact(cfg.model_dump(mode="json"), _known_secrets(cfg))


def redact_command(cfg: ImitateConfig, argv: list[str]) -> str:
    """The command line as stamped into configs and manifests: re-runnable (shell-quoted), secrets masked."""
    return redact_text(shlex.join(["imitate", *argv]), _known_secrets(cfg))


def to_yaml(cfg: ImitateConfig, command: str | None = None) -> str:
    head = f"# {redact_text(command, _known_secrets(cfg))}\n" if command else ""
    return head + yaml.safe_dump(redacted(cfg), sort_keys=False, allow_unicode=True)


def stamp(cfg: ImitateConfig, out_dir: Path, command: str | None = None) -> Path:
    """Write the resolved, redacted config next to an output (atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "config.yaml"
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg, command), encoding="utf-8")
    os.replace(tmp, target)
    return target


# ---------------------------------------------------------------------------------------------- train
# `imitate train` / `merge` / `chat` (imitate/train/). Kept last; ImitateConfig names TrainConfig and is rebuilt
# at the end of this section once the classes exist.


class LoraConfig(_Cfg):
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt; all-linear = every linear projection except the LM head"
    )


class StageConfig(_Cfg):
    """One stage of progressive training (Orca): a data selection, its epochs and learning rate.

    Stages run in order and continue the same adapter; each gets a fresh optimizer and its own warm-up + cosine
    schedule. Every given filter must match (None = any)."""

    name: str
    teachers: list[str] | None = Field(None, description="provenance.teacher values to train on")
    collections: list[str] | None = Field(None, description="query.collection values to train on")
    tags: list[str] | None = Field(None, description="records carrying any of these tags")
    epochs: int = Field(1, ge=1)
    lr: float | None = Field(None, gt=0, description="None = train.lr")


class TrainConfig(_Cfg):
    model: str | None = Field(
        None, description="student: HF folder, .gguf file or Hub name; None = SmolLM2-135M-Instruct GGUF"
    )
    seed: int = 0
    max_length: int = Field(2048, ge=8, description="longest example in tokens")
    over_length: Literal["drop", "truncate-prompt", "error"] = "drop"
    chat_template: str | None = Field(None, description="Jinja template overriding the tokenizer's")
    batching: Literal["pack", "pad"] = "pack"
    pack_length: int | None = Field(None, ge=8, description="tokens per packed row; None = max_length")
    batch_rows: int = Field(1, ge=1, description="rows per micro-batch")
    grad_accum: int = Field(4, ge=1, description="micro-batches per optimizer step (per process)")
    epochs: int = Field(1, ge=1, description="used when no stages are given")
    lr: float = Field(2e-4, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of the peak lr")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps in total")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="share of records (by id hash) held out")
    eval_every: int = Field(0, ge=0, description="optimizer steps between evals; 0 = at the end of each stage")
    save_every: int = Field(0, ge=0, description="optimizer steps between checkpoints; 0 = none")
    log_every: int = Field(1, ge=1)
    resume: str | None = Field(None, description="'latest' or a checkpoint directory")
    dtype: Literal["auto", "float32", "bfloat16", "fp32", "bf16"] = Field(
        "auto",
        description="auto = bf16 on GPUs with it, else fp32; bf16/bfloat16 = bf16 base weights (CPU too), "
        "LoRA weights in fp32",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="under torchrun: ddp = every rank holds the whole student, gradients summed; fsdp = each decoder "
        "layer sharded over the ranks (FSDP2)",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer in backward (less activation memory, ~1 more forward)"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch's default")
    cpu_mmap_threshold: int | None = Field(
        None,
        ge=4096,
        description="CPU on Linux/glibc: blocks of this many bytes or more (131072 suits) get their own mapping, "
        "returned to the system when freed, so RSS follows the live tensors: 903 instead of 2,077 MiB for SmolLM2 "
        "at 2,048 tokens with checkpointing, but ~30 % fewer tokens/s (bench/RESULTS.md); None = glibc's default",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="QLoRA: load the base in 4/8 bit (bitsandbytes; CUDA only: pip install 'imitate[gpu]')"
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="auto = per-example SDPA when packing, else transformers' default; flash_attention_2 needs "
        "CUDA and flash-attn",
    )
    cache_dir: str | None = Field(None, description="tokenised-data cache; None = $IMITATE_CACHE_DIR or ~/.cache")
    check_examples: int = Field(3, ge=0, description="examples dumped by --check")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    stages: list[StageConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_stages(self) -> TrainConfig:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique, repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _flash_packs_one_row(self) -> TrainConfig:
        # flash-attn separates packed examples by position_ids only for a single row per batch; with more rows
        # transformers runs plain causal attention over each row and packed examples would attend to each other.
        if self.attn_implementation == "flash_attention_2" and self.batching == "pack" and self.batch_rows > 1:
            raise ValueError(
                "train.attn_implementation=flash_attention_2 keeps packed examples apart only with "
                "train.batch_rows=1; set batch_rows=1, batching=pad, or attn_implementation=auto"
            )
        return self


ImitateConfig.model_rebuild()
