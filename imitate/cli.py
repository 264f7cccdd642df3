"""The `imitate` command line: parse, call one function, print. Holds the only `asyncio.run` of the project.

    imitate --help
    imitate config show [--config FILE] [--set k=v]
    imitate fake-teacher --port 8089 [--rpm N --tpm N --faults 500=0.02,reset=0.01]
    imitate harvest INPUT --out DIR [...]      |   imitate status DIR
    imitate generate self-instruct SEEDS --out DIR --target N [...]
    imitate generate best-of-n PROMPTS --out DIR --n N [--source teacher|student] [--scorer judge|reward]
    imitate convert IN --to FORMAT --out PATH  |   imitate train DATA --out DIR [...]
    imitate merge ... | imitate chat ...
    imitate serve [MODEL] [--adapter DIR] [--port 8000] [--max-batch 16] [--queue 16] [--api-key-env VAR]
    imitate eval bench --model M [--adapter DIR] --data FILE ... --out DIR
    imitate eval judge --model M [--adapter DIR] --questions FILE --judge-base-url URL --judge-model NAME --out DIR
    imitate eval lm-eval --model M [--adapter DIR] --tasks mmlu,gsm8k --out DIR [--include-path DIR]

Exit codes: an ImitateError is one line on stderr and its own code (`--debug` adds the traceback, same code); a
usage error prints click's usage line and exits 2; Ctrl-C at any moment exits 130 with a message (the console
script's entry, `imitate/__main__.py`, covers the imports before this module is loaded).
Heavy modules (torch, openai) are imported inside the commands that need them, never at import time.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import typer

from imitate import __version__
from imitate.errors import ImitateError, Interrupted

app = typer.Typer(
    name="imitate",
    help="Imitation-data distillation: harvest teacher explanations, curate, LoRA-train a student, publish.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

_state: dict = {"debug": False, "argv": []}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"imitate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _state["debug"] = debug


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file.", dir_okay=False)
SetOpt = typer.Option(None, "--set", help="Override a config key: --set harvest.params.temperature=0.2")
# the first teacher's endpoint and limits, and the budget, as flags (commands that ask one teacher)
BaseUrlOpt = typer.Option(None, help="Teacher base URL (first teacher).")
TeacherModelOpt = typer.Option(None, help="Teacher model (first teacher).")
ApiKeyEnvOpt = typer.Option(None, help="Env var holding the API key (first teacher).")
RpmOpt = typer.Option(None, help="Requests per minute (first teacher).")
TpmOpt = typer.Option(None, help="Tokens per minute (first teacher).")
MaxTokensOpt = typer.Option(None, help="Stop before using more tokens than this.")
MaxRequestsOpt = typer.Option(None, help="Stop before sending more requests than this.")
# the student and its base, as the eval commands name them
StudentOpt = typer.Option(None, "--model", help="Student: folder, .gguf, merged folder or adapter folder.")
AdapterOpt = typer.Option(None, "--adapter", help="LoRA adapter applied to --model (or its own base).")
BaseOpt = typer.Option(None, "--base", help="Base to compare with (default: what the student records).")
NoBaseOpt = typer.Option(False, "--no-base", help="Evaluate the student alone.")
JudgeMaxTokensOpt = typer.Option(
    None, "--judge-max-tokens", min=1, help="Cap the judge's reply (default: the judge prompt's 1024)."
)


@config_app.command("show")
def config_show(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt) -> None:
    """Print the resolved configuration (defaults < file < --set), secrets redacted."""
    from imitate.config import load_config, to_yaml

    typer.echo(to_yaml(load_config(config, set_ or [])), nl=False)


@app.command(
    "fake-teacher",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def fake_teacher(ctx: typer.Context) -> None:
    """Run the loopback OpenAI-compatible fake teacher (tests, the demo, benchmarks). Its options are the fake's
    own, one per FakeConfig field (--port, --rpm, --tpm, --faults, --latency-s, --seed, ...): see --help."""
    from imitate.teacher.fake.runner import main as fake_main

    fake_main(list(ctx.args), prog="imitate fake-teacher")


def _flag_overrides(**flags: object) -> list[str]:
    """Command-line flags become overrides applied last: flags win over the file and --set."""
    mapping = {
        "base_url": "harvest.teachers.0.base_url",
        "model": "harvest.teachers.0.model",
        "api_key_env": "harvest.teachers.0.api_key_env",
        "rpm": "harvest.teachers.0.rpm",
        "tpm": "harvest.teachers.0.tpm",
        "preset": "harvest.preset",
        "max_usd": "harvest.budget.max_usd",
        "max_tokens": "harvest.budget.max_tokens",
        "max_requests": "harvest.budget.max_requests",
        "mode": "harvest.mode",
        "samples": "harvest.samples_per_prompt",
        "skip_bad_rows": "harvest.source.skip_bad_rows",
    }
    return [f"{mapping[k]}={v}" for k, v in flags.items() if v is not None and v is not False]


def _run_async(make):
    """The project's one `asyncio.run`, with Ctrl-C held back while the event loop is built: a signal landing
    inside the loop's constructor leaves a half-built loop (a traceback at exit) instead of a clean stop. The
    held signal is delivered right after, as a KeyboardInterrupt (exit 130), or inside the run, where the
    harvest's own handler drains."""
    import asyncio
    import signal

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        runner = asyncio.Runner()
        runner.get_loop()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    with runner:
        coro = make()
        try:
            return runner.run(coro)
        finally:
            coro.close()  # never started (Ctrl-C just before): no "never awaited" warning; else a no-op


@app.command("harvest")
def harvest_cmd(
    input: str = typer.Argument(
        ..., metavar="INPUT", help="JSONL/CSV/Parquet file, saved datasets folder or Hub name (owner/name)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (shards, journal, manifest)."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    base_url: str | None = BaseUrlOpt,
    model: str | None = TeacherModelOpt,
    api_key_env: str | None = ApiKeyEnvOpt,
    rpm: int | None = RpmOpt,
    tpm: int | None = TpmOpt,
    preset: str | None = typer.Option(
        None, help="System-message preset: orca, orca-cot, orca-niv2, orca-t0, orca-flan, none."
    ),
    max_usd: float | None = typer.Option(None, help="Stop before spending more than this."),
    max_tokens: int | None = MaxTokensOpt,
    max_requests: int | None = MaxRequestsOpt,
    mode: str | None = typer.Option(None, help="online (default) or batch (Batch API)."),
    samples: int | None = typer.Option(None, "--n", help="Samples per prompt."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Skip and count malformed input rows."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and estimate; send nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress view."),
    json_log: bool = typer.Option(False, "--json-log", help="Progress as JSON lines on stderr."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print the whole resolved config at start."),
) -> None:
    """Harvest teacher answers for every input row: rate-limited, resumable, budgeted."""
    import json

    from imitate.config import load_config, redact_command, to_yaml
    from imitate.errors import InputError
    from imitate.harvest import run as harvest_run

    overrides = (set_ or []) + _flag_overrides(
        base_url=base_url,
        model=model,
        api_key_env=api_key_env,
        rpm=rpm,
        tpm=tpm,
        preset=preset,
        max_usd=max_usd,
        max_tokens=max_tokens,
        max_requests=max_requests,
        mode=mode,
        samples=samples,
        skip_bad_rows=skip_bad_rows,
    )
    cfg = load_config(config, overrides)
    if dry_run:
        typer.echo(json.dumps(harvest_run.dry_run(cfg, input, out), indent=2))
        return
    if out is None:
        raise InputError("--out DIR is required", hint="imitate harvest INPUT --out data/runs/NAME")
    _check_writable(out)
    command = redact_command(cfg, _state["argv"] or ["harvest"])
    progress = "quiet" if quiet else "json" if json_log else ("live" if sys.stderr.isatty() else "lines")
    if verbose:
        typer.echo(to_yaml(cfg, command), err=True)
    elif not quiet:
        from imitate.harvest.progress import settings_summary

        typer.echo(settings_summary(cfg, out), err=True)
    if cfg.harvest.mode == "batch":
        from imitate.harvest import batch

        outcome = _run_async(lambda: batch.harvest_batch(cfg, input, out, command=command))
    else:
        outcome = _run_async(lambda: harvest_run.harvest(cfg, input, out, command=command, progress=progress))
    t = outcome.manifest["totals"]
    r = outcome.manifest["this_run"]
    typer.echo(
        f"{outcome.manifest['status']}: {t['ok']} ok, {t['failed']} failed, pending {t['pending']}, "
        f"spend ${t['spend_usd']:.4f} (this run: {r['ok']} ok, {r['requests']} requests, "
        f"{r['throttled_429']} throttled) -> {out}"
    )
    if outcome.error is not None:
        raise outcome.error


def _check_writable(out: Path) -> None:
    """A bad --out fails here, before a teacher is asked anything, rather than as a traceback mid-run."""
    import tempfile

    from imitate.errors import InputError

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory", hint="choose a directory for the output")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Creating a file is the one check that ACLs, read-only mounts and root all answer truthfully.
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise InputError(
            f"--out {out}: cannot write there ({exc.strerror})", hint="choose a writable directory"
        ) from exc


@app.command("status")
def status_cmd(out: Path = typer.Argument(..., metavar="DIR", help="The --out directory of a harvest.")) -> None:
    """How far a harvest got: done, failed, pending, spend and the last run's stop reason, as JSON."""
    import json

    from imitate.harvest.run import status

    typer.echo(json.dumps(status(out), indent=2))


@app.command("mix")
def mix_cmd(
    inputs: list[str] = typer.Argument(
        ..., metavar="IN[=WEIGHT|:COUNT]", help="Record sets: IN=0.3 a share, IN:500 a count, IN all of it."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: records.jsonl + manifest.json."),
    seed: int = typer.Option(0, "--seed", help="Seed of the (deterministic) choice of records."),
    total: int | None = typer.Option(None, "--total", help="Records in the mix (default: the most the sets allow)."),
    format: str = typer.Option("auto", "--format", help="Format of the inputs: auto or a format name."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Skip and count malformed input rows."),
) -> None:
    """Mix record sets by weights or counts (Koala), seeded, provenance kept, each record tagged mix:<set>."""
    import shlex

    from imitate.config import redact_text
    from imitate.dataset.mix import mix, parse_specs

    command = redact_text(shlex.join(["imitate", *(_state["argv"] or ["mix"])]))
    m = mix(parse_specs(inputs), out, seed=seed, total=total, fmt=format, skip_bad_rows=skip_bad_rows, command=command)
    for s in m["sets"]:
        typer.echo(f"{s['name']}: {s['taken']} of {s['available']} ({s['share']:.1%}, {s['spec']})")
    typer.echo(f"{m['records']} records -> {out / 'records.jsonl'}")


@app.command("export")
def export_cmd(
    data: Path = typer.Argument(..., metavar="DIR", help="Records: a harvest/curate/mix output dir or a data file."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to write (Parquet shards + README.md card)."),
    format: str = typer.Option("messages", "--format", help="openorca, sharegpt, alpaca, messages or imitate."),
    hub: str | None = typer.Option(None, "--hub", help="Also push the folder to this Hub dataset repo (user/name)."),
    private: bool = typer.Option(False, "--private", help="Create the Hub repo private."),
    licence: str = typer.Option("unknown", "--licence", "--license", help="Hub licence id for the card."),
    language: list[str] | None = typer.Option(None, "--language", help="Language code(s) for the card (default en)."),
    name: str | None = typer.Option(None, "--name", help="The card's pretty_name (default: the DIR name)."),
    test_fraction: float = typer.Option(0.0, "--test-fraction", help="Share of rows (by id hash) in a test split."),
    shard_rows: int = typer.Option(100_000, "--shard-rows", help="Rows per Parquet shard."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Skip and count rows the format cannot hold."),
) -> None:
    """Write a Hub dataset folder (Parquet + provenance card) and optionally push it with huggingface_hub."""
    import shlex

    from imitate.config import redact_text
    from imitate.errors import InputError
    from imitate.export import export
    from imitate.export.hub import check_repo_id, hub_token, push

    if private and not hub:
        raise InputError("--private applies to a push: add --hub user/name")
    token = None
    if hub:  # a bad repo id or no token stops here, before any work
        check_repo_id(hub)
        token = hub_token()
    command = redact_text(shlex.join(["imitate", *(_state["argv"] or ["export"])]), [token] if token else None)
    result = export(data, out, fmt=format, licence=licence, languages=tuple(language or ["en"]), pretty_name=name,
                    test_fraction=test_fraction, shard_rows=shard_rows, skip_bad_rows=skip_bad_rows, command=command,
                    extra_secrets=[token] if token else None, load_name=hub)  # fmt: skip
    rows = ", ".join(f"{n} {split}" for split, n in result.rows.items())
    typer.echo(f"{rows} rows ({format}) -> {out}")
    if hub and token:
        url = push(out, hub, private=private, token=token, commit_message=f"imitate export: {rows} rows ({format})")
        typer.echo(f"pushed -> {url}")


@app.command("convert")
def convert_cmd(
    input: str = typer.Argument(
        ..., metavar="IN", help="JSON/JSONL/CSV/Parquet file, records folder, save_to_disk folder or Hub name."
    ),
    to: str = typer.Option(..., "--to", help="Output format: openorca, sharegpt, alpaca, messages or imitate."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file: .jsonl, .json, .csv, .tsv or .parquet."),
    format: str = typer.Option("auto", "--format", help="Input format (default: detected from the columns)."),
    split: str | None = typer.Option(None, "--split", help="Split of a datasets folder or Hub dataset."),
    skip_bad_rows: bool = typer.Option(
        False, "--skip-bad-rows", help="Skip and count bad rows and records the output format cannot hold."
    ),
) -> None:
    """Convert between OpenOrca, ShareGPT, Alpaca, messages and imitate records (written atomically)."""
    from imitate.dataset.convert import convert

    result = convert(input, out, to, format=format, split=split, skip_bad_rows=skip_bad_rows)
    for example in result.examples():
        typer.echo(f"skipped: {example}", err=True)
    typer.echo(result.summary())


@app.command("curate")
def curate_cmd(
    input: str = typer.Argument(
        ..., metavar="IN", help="Records (harvest dir, JSONL/Parquet) or any format convert reads."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output dir: records.jsonl, dropped.jsonl, manifest.json."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    format: str = typer.Option("auto", "--format", help="Input format (default: detected from the columns)."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Skip and count malformed input rows."),
    erase_system: str | None = typer.Option(None, "--erase-system", help="generic or none: prompt erasure (Orca 2)."),
    keep_failed: bool = typer.Option(False, "--keep-failed", help="Do not drop failed rows."),
    keep_truncated: bool = typer.Option(False, "--keep-truncated", help="Do not drop finish_reason=length rows."),
    keep_refusals: bool = typer.Option(False, "--keep-refusals", help="Do not drop refusals and AI disclaimers."),
    phrases: Path | None = typer.Option(None, "--phrases", help="More refusal/disclaimer phrases (YAML or lines)."),
    min_words: int | None = typer.Option(None, "--min-words", help="Drop answers with fewer words (default 1)."),
    min_steps: int | None = typer.Option(None, "--min-steps", help="Drop answers with fewer reasoning steps."),
    max_words: int | None = typer.Option(None, "--max-words", help="Drop conversations longer than this (words)."),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", help="...or than this many tokens (needs --tokenizer)."
    ),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="The student's tokenizer.json (or model folder)."),
    no_exact_dup: bool = typer.Option(False, "--no-exact-dup", help="Keep exact duplicates."),
    no_near_dup: bool = typer.Option(False, "--no-near-dup", help="Keep near-duplicates (MinHash + LSH)."),
    near_dup_threshold: float | None = typer.Option(None, "--near-dup-threshold", help="Jaccard threshold (0.8)."),
    num_perm: int | None = typer.Option(None, "--num-perm", help="MinHash permutations (128)."),
    shingle: int | None = typer.Option(None, "--shingle", help="Shingle size (5)."),
    shingle_unit: str | None = typer.Option(None, "--shingle-unit", help="word (default) or char shingles."),
    max_rouge: float | None = typer.Option(None, "--max-rouge", help="Drop questions with ROUGE-L above this (0.7)."),
    lang: str | None = typer.Option(None, "--lang", help="Keep only these languages, e.g. en or en,de."),
    top_k: int | None = typer.Option(None, "--top-k", help="LIMA-style: keep the k best-scoring rows."),
    score_field: str | None = typer.Option(None, "--score-field", help="Score by record.scores[NAME] (heuristic)."),
    per_cluster: int | None = typer.Option(None, "--per-cluster", help="With --top-k: at most M per near-dup cluster."),
    per_collection: int | None = typer.Option(None, "--per-collection", help="With --top-k: at most M per collection."),
) -> None:
    """Drop failed, truncated, refused, short, long, duplicate rows (each gate counted, each drop kept with its
    reason), optionally select the top k (LIMA) and erase the system prompt (Orca 2)."""
    import shlex

    from imitate.config import load_config, redact_text
    from imitate.dataset.curate import check_out, curate, flag_overrides

    flags = dict(
        erase_system=erase_system,
        keep_failed=keep_failed,
        keep_truncated=keep_truncated,
        keep_refusals=keep_refusals,
        phrases=str(phrases) if phrases else None,
        min_words=min_words,
        min_steps=min_steps,
        max_words=max_words,
        max_tokens=max_tokens,
        tokenizer=tokenizer,
        no_exact_dup=no_exact_dup,
        no_near_dup=no_near_dup,
        near_dup_threshold=near_dup_threshold,
        num_perm=num_perm,
        shingle=shingle,
        shingle_unit=shingle_unit,
        max_rouge=max_rouge,
        lang=lang,
        top_k=top_k,
        score_field=score_field,
        per_cluster=per_cluster,
        per_collection=per_collection,
    )
    cfg = load_config(config, (set_ or []) + flag_overrides(**flags))
    check_out(input, out)
    _check_writable(out)
    command = redact_text(shlex.join(["imitate", *(_state["argv"] or ["curate"])]))
    m = curate(input, out, cfg.curate, format=format, skip_bad_rows=skip_bad_rows, command=command)
    dropped = ", ".join(f"{g} {n}" for g, n in m["gates"].items() if n) or "none"
    typer.echo(f"{m['input']['read']} rows: kept {m['output']['kept']}, dropped {dropped} -> {out}")


@app.command("train")
def train_cmd(
    data: Path = typer.Argument(
        ..., help="Records (harvest dir, JSONL/Parquet), or an OpenOrca/ShareGPT/Alpaca/messages file or dataset."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (adapter, metrics, loss curve)."),
    model: str | None = typer.Option(None, "--model", help="Student: local HF folder, .gguf file, or Hub name."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    check: bool = typer.Option(False, "--check", help="Tokenise, summarise refusals, dump a few masks; no training."),
    estimate_memory: bool = typer.Option(
        False, "--estimate-memory", help="Print the expected peak memory from the model's config; no training."
    ),
) -> None:
    """LoRA SFT of the student on harvested records (one explicit loop; runs unchanged under torchrun)."""
    from imitate.train.commands import train_command

    train_command(
        data, out, model=model, config=config, overrides=set_ or [], check=check, estimate_memory=estimate_memory
    )


@app.command("merge")
def merge_cmd(
    adapter: Path = typer.Argument(..., help="Adapter directory written by imitate train."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the merged full model."),
    model: str | None = typer.Option(None, "--model", help="Base model (default: the one the adapter records)."),
) -> None:
    """Merge an adapter into its base and check merged logits equal base+adapter logits."""
    from imitate.train.commands import merge_command

    merge_command(adapter, out, model=model)


@app.command("chat")
def chat_cmd(
    model: str | None = typer.Argument(None, help="Model folder or .gguf (default: the local SmolLM2 student)."),
    adapter: Path | None = typer.Option(None, "--adapter", help="LoRA adapter directory to apply."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="One-shot prompt; without it, read stdin lines."),
    system: str | None = typer.Option(None, "--system", help="System message (none by default)."),
    max_new_tokens: int = typer.Option(256, help="Generation length."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
) -> None:
    """Talk to a student (optionally with an adapter): one-shot or interactive."""
    from imitate.train.commands import chat_command

    chat_command(model, adapter, prompt=prompt, system=system, max_new_tokens=max_new_tokens, temperature=temperature)


@app.command("serve")
def serve_cmd(
    model: str | None = typer.Argument(None, help="Model folder, .gguf, merged model or adapter (default: SmolLM2)."),
    adapter: Path | None = typer.Option(None, "--adapter", help="LoRA adapter directory (merged in memory)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 exposes the server to the network)."),
    port: int = typer.Option(8000, help="Port (0: a free one, printed at start)."),
    api_key_env: str | None = typer.Option(None, help="Require this env var's value as the bearer token."),
    max_batch: int = typer.Option(16, help="Sequences decoded together (continuous batching)."),
    queue: int = typer.Option(16, help="Sequences that may wait beyond the batch; more get 429 + Retry-After."),
    max_model_len: int | None = typer.Option(None, help="Context limit (default: the model's positions)."),
    model_name: str | None = typer.Option(None, help="Model id clients send (default: the file or folder name)."),
    threads: int | None = typer.Option(None, help="torch threads (default: all cores but one)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 (faster where the CPU has bf16), or auto."),
) -> None:
    """Serve a model as an OpenAI-compatible teacher: chat completions with continuous batching."""
    from imitate.serve import serve_command

    options = {"adapter": adapter, "host": host, "port": port, "api_key_env": api_key_env, "dtype": dtype}
    limits = {"max_batch": max_batch, "queue": queue, "max_model_len": max_model_len, "threads": threads}
    _run_async(serve_command(model, model_name=model_name, **options, **limits))


import_app = typer.Typer(help="Import and clean datasets made by other tools.", no_args_is_help=True)
app.add_typer(import_app, name="import")


@import_app.command("sharegpt")
def import_sharegpt_cmd(
    input: str = typer.Argument(..., metavar="IN", help="ShareGPT export: JSON array or JSONL (or CSV/Parquet/Hub)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: records.jsonl, dropped.jsonl, manifest.json."),
    lang: str | None = typer.Option(None, "--lang", help="Keep only these languages of the user turns: en,de"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Split longer conversations at turn boundaries."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="tokenizer.json (or model folder) to count tokens."),
    near_dup_threshold: float = typer.Option(0.9, "--near-dup-threshold", help="MinHash-LSH Jaccard threshold."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Drop and count bad rows instead of stopping."),
) -> None:
    """Vicuna/Koala cleaning: HTML to Markdown, roles, alternation, language, dedup, split by token budget."""
    from imitate.dataset.language import parse_languages
    from imitate.dataset.sharegpt_import import ImportSettings, import_sharegpt

    settings = ImportSettings(
        languages=tuple(sorted(parse_languages(lang))),
        max_tokens=max_tokens,
        tokenizer=tokenizer,
        near_dup_threshold=near_dup_threshold,
        skip_bad_rows=skip_bad_rows,
    )
    summary = import_sharegpt(input, out, settings)
    typer.echo("; ".join(summary.lines()) + f" -> {out}")


generate_app = typer.Typer(help="Generate new training data with a teacher.", no_args_is_help=True)
app.add_typer(generate_app, name="generate")


@generate_app.command("self-instruct")
def generate_self_instruct_cmd(
    seeds: str = typer.Argument(
        ..., metavar="SEEDS", help="Seed tasks: Self-Instruct's seed JSONL or instruction rows."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (tasks, records, manifest, journals)."),
    target: int = typer.Option(..., "--target", "-n", min=1, help="Answered tasks to produce."),
    per_round: int = typer.Option(4, "--per-round", min=1, help="Generation prompts asked at once per round."),
    max_rounds: int | None = typer.Option(None, "--max-rounds", min=1, help="Stop after this many rounds."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    base_url: str | None = BaseUrlOpt,
    model: str | None = TeacherModelOpt,
    api_key_env: str | None = ApiKeyEnvOpt,
    rpm: int | None = RpmOpt,
    tpm: int | None = TpmOpt,
    preset: str | None = typer.Option(None, help="System-message preset for the answers (orca, none, ...)."),
    max_usd: float | None = typer.Option(None, help="Stop before spending more than this (both steps, all runs)."),
    max_tokens: int | None = MaxTokensOpt,
    max_requests: int | None = MaxRequestsOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No config dump, no per-round lines."),
    json_log: bool = typer.Option(False, "--json-log", help="Harvest progress as JSON lines on stderr."),
) -> None:
    """Self-Instruct (Alpaca): the teacher writes new tasks from seed tasks, they are filtered, then answered."""
    from imitate.config import load_config, redact_command, to_yaml
    from imitate.dataset.selfinstruct_run import self_instruct

    overrides = (set_ or []) + _flag_overrides(
        base_url=base_url, model=model, api_key_env=api_key_env, rpm=rpm, tpm=tpm, preset=preset,
        max_usd=max_usd, max_tokens=max_tokens, max_requests=max_requests,
    )  # fmt: skip
    cfg = load_config(config, overrides)
    _check_writable(out)
    command = redact_command(cfg, _state["argv"] or ["generate", "self-instruct"])
    if not quiet:
        typer.echo(to_yaml(cfg, command), err=True)
    log = None if quiet else (lambda line: typer.echo(line, err=True))
    outcome = _run_async(
        lambda: self_instruct(
            cfg,
            seeds,
            out,
            target=target,
            per_round=per_round,
            max_rounds=max_rounds,
            command=command,
            progress="json" if json_log else "quiet",
            log=log,
        )  # fmt: skip
    )
    m = outcome.manifest
    typer.echo(
        f"{m['status']}: {m['answered']}/{m['target']} tasks answered, {m['kept']} kept of {m['generated']} "
        f"generated in {m['rounds']} rounds, spend ${m['spend_usd']:.4f} -> {out}"
    )
    if outcome.error is not None:
        raise outcome.error


@generate_app.command("best-of-n")
def generate_best_of_n_cmd(
    prompts: str = typer.Argument(..., metavar="PROMPTS", help="Prompts: any file or dataset imitate harvest reads."),
    out: Path = typer.Option(..., "--out", "-o", help="Output dir: records, samples, pairs, manifest, journals."),
    n: int = typer.Option(..., "--n", min=1, help="Answers sampled per prompt."),
    source: str = typer.Option("teacher", "--source", help="teacher (harvested) or student (sampled locally)."),
    scorer: str = typer.Option("judge", "--scorer", help="judge (LLM judge, 1-10) or reward (--reward-model)."),
    reward_model: Path | None = typer.Option(None, "--reward-model", help="Local HF sequence-classification folder."),
    keep: str = typer.Option("best", "--keep", help="best, or best-worst (also pairs.jsonl for DPO)."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    base_url: str | None = typer.Option(None, help="Teacher base URL (first teacher)."),
    model: str | None = typer.Option(None, help="Teacher model (first teacher)."),
    api_key_env: str | None = typer.Option(None, help="Env var holding the teacher's API key."),
    rpm: int | None = typer.Option(None, help="Requests per minute (teacher)."),
    tpm: int | None = typer.Option(None, help="Tokens per minute (teacher)."),
    preset: str | None = typer.Option(None, help="System-message preset of the teacher's samples (orca, none, ...)."),
    judge_base_url: str | None = typer.Option(None, "--judge-base-url", help="Judge endpoint (default: the teacher)."),
    judge_model: str | None = typer.Option(None, "--judge-model", help="Judge model (default: the teacher's)."),
    judge_api_key_env: str | None = typer.Option(None, "--judge-api-key-env", help="Env var of the judge's key."),
    student_model: str | None = typer.Option(None, "--student-model", help="--source student: folder, .gguf, adapter."),
    adapter: Path | None = typer.Option(None, "--adapter", help="--source student: LoRA adapter on --student-model."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0, max=2.0, help="--source student: sampling."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="--source student: answer length."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Local generation / reward-model batch."),
    seed: int = typer.Option(0, "--seed", help="--source student: sampling seed (each prompt derives its own)."),
    max_reasks: int = typer.Option(2, "--max-reasks", min=0, max=5, help="Re-asks of an unreadable judge verdict."),
    judge_max_tokens: int | None = JudgeMaxTokensOpt,
    max_usd: float | None = typer.Option(None, help="Stop before spending more than this (samples + judge, all runs)."),
    max_tokens: int | None = MaxTokensOpt,
    max_requests: int | None = MaxRequestsOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No config dump, no progress lines."),
) -> None:
    """Rejection sampling: n answers per prompt, scored by a judge or a reward model, the best kept (as records)."""
    from imitate.config import load_config, redact_command, to_yaml
    from imitate.evaluate.bestofn import BestOfN, BestOfNOptions, headline

    budget = {"max_usd": max_usd, "max_tokens": max_tokens, "max_requests": max_requests}
    teacher = _flag_overrides(base_url=base_url, model=model, api_key_env=api_key_env, rpm=rpm, tpm=tpm, preset=preset,
                              **budget)  # fmt: skip
    cfg = load_config(config, (set_ or []) + teacher)
    judge = _flag_overrides(base_url=judge_base_url or base_url, model=judge_model or model,
                            api_key_env=judge_api_key_env or api_key_env, **budget)  # fmt: skip
    judge_cfg = load_config(config, (set_ or []) + judge)
    _check_writable(out)
    command = redact_command(cfg, _state["argv"] or ["generate", "best-of-n"])
    if not quiet:
        typer.echo(to_yaml(cfg, command), err=True)
    options = BestOfNOptions(
        prompts=prompts, out=out, n=n, source=source, scorer=scorer, keep=keep, reward_model=reward_model,
        student_model=student_model, adapter=adapter, temperature=temperature, max_new_tokens=max_new_tokens,
        batch_size=batch_size, seed=seed, max_reasks=max_reasks, judge_max_tokens=judge_max_tokens,
    )  # fmt: skip
    log = None if quiet else (lambda line: typer.echo(line, err=True))
    job = BestOfN(cfg, options, judge_cfg=judge_cfg, command=command, log=log)
    job.prepare()
    _run_async(job.collect)
    job.score_local()
    typer.echo(f"{headline(job.finish())} -> {out}")


eval_app = typer.Typer(help="Evaluate a student beside its base: benchmarks, judge, lm-eval.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("judge")
def eval_judge_cmd(
    questions: str = typer.Option(
        ..., "--questions", help="Questions (id, question, category): any file harvest reads."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder: judge_scores.jsonl, judge.json/png, report.md."),
    model: str | None = StudentOpt,
    adapter: Path | None = AdapterOpt,
    base: str | None = BaseOpt,
    no_base: bool = typer.Option(False, "--no-base", help="No base: the student alone or against --teacher-*."),
    mode: str = typer.Option("both", "--mode", help="single (1-10 grades), pairwise (both orders) or both."),
    judge_base_url: str | None = typer.Option(None, "--judge-base-url", help="Judge endpoint (OpenAI-compatible)."),
    judge_model: str | None = typer.Option(None, "--judge-model", help="Judge model."),
    api_key_env: str | None = typer.Option(None, help="Env var holding the judge's API key."),
    rpm: int | None = typer.Option(None, help="Judge requests per minute."),
    tpm: int | None = typer.Option(None, help="Judge tokens per minute."),
    teacher_base_url: str | None = typer.Option(None, "--teacher-base-url", help="Also judge this endpoint's answers."),
    teacher_model: str | None = typer.Option(None, "--teacher-model", help="The teacher endpoint's model."),
    teacher_api_key_env: str | None = typer.Option(None, "--teacher-api-key-env", help="Env var of the teacher's key."),
    max_usd: float | None = typer.Option(None, help="Stop before spending more than this (judge + teacher, all runs)."),
    max_tokens: int | None = MaxTokensOpt,
    max_requests: int | None = MaxRequestsOpt,
    max_reasks: int = typer.Option(2, "--max-reasks", min=0, max=5, help="Re-asks of an unreadable verdict."),
    judge_max_tokens: int | None = JudgeMaxTokensOpt,
    limit: int | None = typer.Option(None, "--limit", min=1, help="First N questions."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="Answer length of the local models."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Questions per generation batch."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """LLM judge (MT-Bench style): 1-10 grades, and student vs base (vs teacher) compared in both orders."""
    from imitate.config import load_config, redact_command
    from imitate.evaluate.judge_eval import JudgeEval, JudgeOptions, headline

    budget = {"max_usd": max_usd, "max_tokens": max_tokens, "max_requests": max_requests}
    flags = _flag_overrides(base_url=judge_base_url, model=judge_model, api_key_env=api_key_env, rpm=rpm, tpm=tpm,
                            **budget)  # fmt: skip
    cfg = load_config(config, (set_ or []) + flags)
    teacher_cfg = None
    if teacher_base_url or teacher_model:
        flags = _flag_overrides(base_url=teacher_base_url, model=teacher_model, preset="none",
                                api_key_env=teacher_api_key_env or api_key_env, **budget)  # fmt: skip
        teacher_cfg = load_config(config, (set_ or []) + flags)
    _check_writable(out)
    options = JudgeOptions(
        questions=questions, out=out, model=model, adapter=adapter, base=base, no_base=no_base, mode=mode,
        limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size, max_reasks=max_reasks,
        judge_max_tokens=judge_max_tokens,
    )  # fmt: skip
    command = redact_command(cfg, _state["argv"] or ["eval", "judge"])
    log = None if quiet else (lambda line: typer.echo(line, err=True))
    job = JudgeEval(cfg, options, teacher_cfg=teacher_cfg, command=command, log=log)
    job.prepare()
    _run_async(job.judge)
    typer.echo(f"{headline(job.finish())} -> {out / 'report.md'}")


@eval_app.command("bench")
def eval_bench_cmd(
    data: list[str] = typer.Option(..., "--data", help="Eval set file (repeatable): MMLU, ARC, GSM8K or mapped."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder: report.md, report.json, per-item results."),
    model: str | None = StudentOpt,
    adapter: Path | None = AdapterOpt,
    base: str | None = BaseOpt,
    no_base: bool = NoBaseOpt,
    format: str = typer.Option("auto", "--format", help="mmlu, arc, gsm8k, mc (with --columns) or auto."),
    columns: str | None = typer.Option(None, "--columns", help="Column mapping: question=q,choices=opts,answer=gold"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="First N items of each set."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Questions per forward pass / generation batch."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Generation length for GSM8K-style sets."),
    extract: str | None = typer.Option(None, "--extract", help="auto, last-number, marker:TEXT, regex:RE, choice."),
    train_data: list[str] | None = typer.Option(None, "--train-data", help="Training records for the overlap check."),
    ngram: int = typer.Option(13, "--ngram", min=1, help="n of the contamination n-gram check."),
    seed: int = typer.Option(0, "--seed", help="Seed of the paired bootstrap."),
    prompt: str = typer.Option("chat", "--prompt", help="Multiple-choice prompt: chat (template) or plain."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's)."),
) -> None:
    """Student and base side by side on eval sets: accuracy with 95% CI, paired difference, contamination."""
    from imitate.evaluate.bench import BenchOptions, bench_command

    options = BenchOptions(
        data=list(data), out=out, model=model, adapter=adapter, base=base, no_base=no_base, format=format,
        columns=columns, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens, extract=extract,
        train_data=list(train_data or []), ngram=ngram, seed=seed, prompt=prompt, threads=threads,
    )  # fmt: skip
    bench_command(options, argv=_state["argv"] or ["eval", "bench"])


@eval_app.command("lm-eval")
def eval_lm_eval_cmd(
    tasks: list[str] = typer.Option(..., "--tasks", help="lm-eval tasks/groups, comma-separated: mmlu,gsm8k"),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder: report.md, report.json, lm-eval/ results."),
    model: str | None = StudentOpt,
    adapter: Path | None = AdapterOpt,
    base: str | None = BaseOpt,
    no_base: bool = NoBaseOpt,
    include_path: list[Path] | None = typer.Option(None, "--include-path", help="Folder of local task YAMLs."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="First N items of each task (a quick look)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Requests per forward pass."),
    num_fewshot: int | None = typer.Option(None, "--num-fewshot", min=0, help="Few-shot examples (task default)."),
    chat_template: bool = typer.Option(False, "--chat-template", help="Render prompts with the chat template."),
    seed: int = typer.Option(0, "--seed", help="Seed of the harness and of the paired bootstrap."),
) -> None:
    """EleutherAI's lm-evaluation-harness on the student and its base, folded into the report (needs the lmeval
    extra: pip install 'imitate[lmeval]')."""
    from imitate.evaluate.lmeval import LmEvalOptions, lm_eval_command

    options = LmEvalOptions(
        tasks=list(tasks), out=out, model=model, adapter=adapter, base=base, no_base=no_base,
        include_path=list(include_path or []), limit=limit, batch_size=batch_size, num_fewshot=num_fewshot,
        chat_template=chat_template, seed=seed,
    )  # fmt: skip
    lm_eval_command(options, argv=_state["argv"] or ["eval", "lm-eval"], echo=typer.echo)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return the process exit code (never raises for an error meant for the user)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = "--debug" in argv
    _state["argv"] = argv
    try:
        # With standalone_mode=False typer *returns* the code of typer.Exit / ctx.exit, and turns a Ctrl-C inside
        # a command into Exit(130) without a word: both only come back here as a number.
        code = app(args=argv, prog_name="imitate", standalone_mode=False)
    except ImitateError as exc:
        from imitate.config import redact_text

        if _state["debug"]:
            traceback.print_exc()
        typer.echo(f"error: {redact_text(exc.one_line())}", err=True)  # URL credentials in a message stay hidden
        return exc.exit_code
    except typer.TyperException as exc:
        # typer >= 0.29 vendors click: its usage errors derive from TyperException, not click.ClickException.
        # `show()` prints the usage line, a --help hint and the error, as click does.
        if hasattr(exc, "show"):
            exc.show()
        else:
            typer.echo(f"Error: {exc.format_message()}", err=True)
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 1
    except KeyboardInterrupt:
        if _state["debug"]:
            traceback.print_exc()
        return interrupted()
    if code == Interrupted.exit_code:
        return interrupted()
    return code if isinstance(code, int) else 0


def interrupted() -> int:
    """Ctrl-C outside a harvest's own signal handling (start-up, parsing, `imitate train`, ...)."""
    sys.stderr.write("interrupted (Ctrl-C)\n")
    return Interrupted.exit_code


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
