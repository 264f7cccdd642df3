"""How much of a rate limit each harvester turns into rows: imitate (limits right, 2x too high, none) against
the two recipes users write first, each against its own rate-limited fake teacher.

    .venv/bin/python bench/harvest_utilisation.py [--rpm 600] [--seconds 240] [--latency 0.3 --jitter 0.7]
    .venv/bin/python bench/harvest_utilisation.py --scenario short --rpm 1200     # 1,800 rows: 30 s ideally
    .venv/bin/python bench/harvest_utilisation.py --scenario shared --rpm 1200 --seconds 180

Every setup gets its own fake teacher process (`FakeTeacherServer(process=True, rpm=R, tpm=T, latency_s=...,
jitter_s=...)`: OpenAI-style token buckets, capacity = the per-minute limit, refilled continuously, starting
full, 429 + Retry-After + `x-ratelimit-*`) and its own client process. Setups run one at a time: a harvester
runs alone on its machine, and on 2 cores several at once slow each other's sends enough to matter (`--parallel`
runs imitate's three at once, then the baselines at once, as a stress test; see bench/RESULTS.md). Each setup is
given `rows = R + R/60 x seconds` prompts: what a perfect client completes in `seconds`, burst included. Over a
run of 240 s the server refills its bucket four times.

- baseline-1:  asyncio + Semaphore(64) + AsyncOpenAI with its default retries (2), gather over every row.
- baseline-2:  the static-bucket recipe: a fixed RPM/TPM token bucket in the client (capacity = the configured
               per-minute limit, starts full), a fixed pause after a 429 (`--pause`, 1 s), 3 attempts, SDK
               retries off; configured right (R/T) and 2x too high.
- imitate (a) `--rpm R --tpm T`, (b) `--rpm 2R --tpm 2T`, (c) no limits: the real CLI, `imitate harvest`.

Measured per setup: rows completed, rows lost (failed, or never finished), requests and 429s as the server
counted them, and utilisation = completed / ideal, where ideal = burst + refill x T (the fewer of the RPM and
TPM bound) and T runs from the client's start to its last completed row.
Targets (issue 4): utilisation >= 0.97, 0 rows lost, 429s <= 2 % of requests, for imitate (a), (b) and (c).

Scenarios (issue 9), imitate's three setups only:
- short: `--seconds 30` of rows (1,800 at 1,200 RPM, the server's bucket full at the start). Also reported: the
  ideal time over the time taken. Targets: >= 0.95 of the ideal time, 0 x 429, 0 lost.
- shared: a second job on the same key (`bench/paced_client.py`, its own process, started first and stopped
  last) sends half the RPM to the same fake teacher, whose buckets are per server; latency 0.2 s fixed unless
  given. imitate gets what that leaves over `--seconds`: burst + refill / 2 x seconds rows. Utilisation =
  imitate's rows / what was left, burst + refill x T less the other job's answered requests in imitate's T;
  429 share = imitate's own. Targets: utilisation >= 0.97, 429s <= 2 %, 0 lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import cpu_seconds  # noqa: E402

MAX_TOKENS = 256
CONCURRENCY = 64  # baseline 1
ATTEMPTS = 3  # baseline 2


def question(i: int) -> str:
    return f"Question {i}: why does the number {i} matter for arithmetic and for counting things?"


def write_input(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"r{i}", "question": question(i)}) + "\n")


def request_tokens(text: str) -> int:
    """What the fake charges against TPM for one request: prompt estimate (+4 framing) plus max_tokens."""
    return (len(text) + 3) // 4 + 4 + MAX_TOKENS


# ---------------------------------------------------------------------------------------------- baselines


async def baseline_1(base_url: str, rows: list[dict], out, errors: dict[str, int]) -> int:
    """The straightforward harvester: SDK defaults, a semaphore, gather. Returns rows lost."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench-not-a-key")
    sem = asyncio.Semaphore(CONCURRENCY)
    lost = 0

    async def one(row: dict) -> None:
        nonlocal lost
        async with sem:
            try:
                r = await client.chat.completions.create(
                    model="fake-teacher", messages=[{"role": "user", "content": row["question"]}], max_tokens=MAX_TOKENS
                )
            except openai.OpenAIError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                lost += 1
                return
            out.write(json.dumps({"id": row["id"], "answer": r.choices[0].message.content, "t": time.time()}) + "\n")

    await asyncio.gather(*(one(row) for row in rows))
    await client.close()
    return lost


class StaticBucket:
    """The recipe's limiter: RPM and TPM buckets with capacity = the configured per-minute limit, refilled
    continuously, starting full; nothing learned from the server. Callers queue on a lock; the one at the head
    sleeps exactly until its request fits."""

    def __init__(self, rpm: int, tpm: int):
        self.rpm, self.tpm = rpm, tpm
        self.requests, self.tokens = float(rpm), float(tpm)
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, tokens: int) -> None:
        async with self.lock:
            while True:
                now = time.monotonic()
                self.requests = min(self.rpm, self.requests + (now - self.stamp) * self.rpm / 60)
                self.tokens = min(self.tpm, self.tokens + (now - self.stamp) * self.tpm / 60)
                self.stamp = now
                if self.requests >= 1 and self.tokens >= tokens:
                    self.requests -= 1
                    self.tokens -= tokens
                    return
                await asyncio.sleep(max((1 - self.requests) * 60 / self.rpm, (tokens - self.tokens) * 60 / self.tpm))


async def baseline_2(
    base_url: str, rows: list[dict], out, errors: dict[str, int], rpm: int, tpm: int, pause: float
) -> int:
    """The static-bucket recipe: fixed bucket, fixed pause after a 429, 3 attempts. Returns rows lost."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench-not-a-key", max_retries=0)
    bucket = StaticBucket(rpm, tpm)
    lost = 0

    async def one(row: dict) -> None:
        nonlocal lost
        for _ in range(ATTEMPTS):
            await bucket.take(request_tokens(row["question"]))
            try:
                r = await client.chat.completions.create(
                    model="fake-teacher", messages=[{"role": "user", "content": row["question"]}], max_tokens=MAX_TOKENS
                )
            except openai.OpenAIError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                await asyncio.sleep(pause)
                continue
            out.write(json.dumps({"id": row["id"], "answer": r.choices[0].message.content, "t": time.time()}) + "\n")
            return
        lost += 1

    await asyncio.gather(*(one(row) for row in rows))
    await client.close()
    return lost


def run_baseline(args: argparse.Namespace) -> None:
    import openai  # noqa: F401 — imported before the clock starts, as for imitate's CLI

    with open(args.input, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    errors: dict[str, int] = {}
    start = time.time()
    with open(args.out, "w", encoding="utf-8") as out:
        if args.child == "baseline-1":
            lost = asyncio.run(baseline_1(args.base_url, rows, out, errors))
        else:
            lost = asyncio.run(baseline_2(args.base_url, rows, out, errors, args.rpm, args.tpm, args.pause))
    print(json.dumps({"start": start, "lost": lost, "errors": errors}), flush=True)


# ---------------------------------------------------------------------------------------------- one setup


def setups(rpm: int, tpm: int) -> list[dict]:
    return [
        {"name": "baseline-1", "limits": "-", "kind": "baseline-1"},
        {"name": "baseline-2 right", "limits": f"{rpm}/{tpm}", "kind": "baseline-2", "rpm": rpm, "tpm": tpm},
        {
            "name": "baseline-2 2x high",
            "limits": f"{2 * rpm}/{2 * tpm}",
            "kind": "baseline-2",
            "rpm": 2 * rpm,
            "tpm": 2 * tpm,
        },  # fmt: skip
        {"name": "imitate (a) right", "limits": f"{rpm}/{tpm}", "kind": "imitate", "rpm": rpm, "tpm": tpm},
        {
            "name": "imitate (b) 2x high",
            "limits": f"{2 * rpm}/{2 * tpm}",
            "kind": "imitate",
            "rpm": 2 * rpm,
            "tpm": 2 * tpm,
        },  # fmt: skip
        {"name": "imitate (c) none", "limits": "none", "kind": "imitate"},
    ]


def client_command(setup: dict, base_url: str, src: Path, out: Path, args: argparse.Namespace) -> list[str]:
    if setup["kind"] == "imitate":
        cmd = [sys.executable, "-m", "imitate.cli", "harvest", str(src), "--out", str(out), "--base-url", base_url]
        cmd += ["--quiet", "--set", "harvest.preset=none", "--set", f"harvest.params.max_tokens={MAX_TOKENS}"]
        if "rpm" in setup:
            cmd += ["--rpm", str(setup["rpm"]), "--tpm", str(setup["tpm"])]
        return cmd
    cmd = [sys.executable, __file__, "--child", setup["kind"], "--base-url", base_url, "--input", str(src)]
    cmd += ["--out", str(out), "--pause", str(args.pause)]
    if "rpm" in setup:
        cmd += ["--rpm", str(setup["rpm"]), "--tpm", str(setup["tpm"])]
    return cmd


def completions(setup: dict, out: Path, proc_out: str) -> tuple[list[float], int, float, dict]:
    """(completion times, rows lost, start time, errors by class) from the client's output."""
    if setup["kind"] == "imitate":
        manifest = json.loads((out / "manifest.json").read_text())
        times = []
        for shard in sorted(out.glob("shard-*.jsonl")):
            with open(shard, encoding="utf-8") as f:
                times += [json.loads(line)["provenance"]["created_at"] for line in f]
        totals = manifest["totals"]
        return times, totals["failed"] + (totals["pending"] or 0), manifest["started_at"], totals["failed_by_class"]
    summary = json.loads(proc_out.strip().splitlines()[-1])
    with open(out, encoding="utf-8") as f:
        times = [json.loads(line)["t"] for line in f]
    return times, summary["lost"], summary["start"], summary["errors"]


def run_setup(setup: dict, args: argparse.Namespace, rows: int, src: Path, tmp: Path) -> dict:
    from imitate.teacher.fake import FakeTeacherServer

    out = tmp / (setup["name"].replace(" ", "_").replace("(", "").replace(")", ""))
    fake = {"rpm": args.rpm, "tpm": args.tpm, "latency_s": args.latency, "jitter_s": args.jitter}
    with FakeTeacherServer(process=True, **fake) as server:
        other = start_other(server.base_url, args, out) if args.scenario == "shared" else None
        cmd = client_command(setup, server.base_url, src, out, args)
        server_cpu = cpu_seconds(server.pid)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        stdout, stderr = proc.communicate()
        answers = stop_other(other, out) if other else []
        stats = server.stats()
        server_cpu = cpu_seconds(server.pid) - server_cpu
    if setup["kind"] != "imitate" and proc.returncode != 0:
        raise RuntimeError(f"{setup['name']} failed:\n{stderr}")
    times, lost, start, errors = completions(setup, out, stdout)
    end = max(times) if times else time.time()
    elapsed = end - start
    per_request = sum(request_tokens(question(i)) for i in range(rows)) / rows
    ideal = min(args.rpm * (1 + elapsed / 60), args.tpm * (1 + elapsed / 60) / per_request)
    other_ok = sum(1 for t, status in answers if status == 200 and start <= t <= end)
    requests = stats["requests"] - len(answers)
    limited = stats["by_status"].get(429, 0) - sum(1 for _, status in answers if status == 429)
    return {
        **setup,
        "ok": len(times),
        "lost": lost,
        "requests": requests,
        "429": limited,
        "share_429": limited / requests if requests else 0.0,
        "elapsed": elapsed,
        "ideal": ideal - other_ok,  # what the other job (shared scenario) left
        "utilisation": len(times) / (ideal - other_ok) if ideal else 0.0,
        "time_ratio": args.seconds / elapsed if elapsed > 0 else 0.0,
        "other_ok": other_ok,
        "other_share": other_ok / (args.other_rps * elapsed) if other and elapsed > 0 else None,
        "server_cpu": server_cpu,
        "exit": proc.returncode,
        "errors": errors,
        "first": (min(times) - start) if times else None,
    }


def start_other(base_url: str, args: argparse.Namespace, out: Path) -> subprocess.Popen:
    """The second job on the key, started a second before imitate (it drains less than the refill, so the
    server's bucket is still full when imitate starts)."""
    stop = out.with_suffix(".stop")
    cmd = [sys.executable, str(ROOT / "bench" / "paced_client.py"), "--base-url", base_url, "--stop", str(stop)]
    proc = subprocess.Popen([*cmd, "--rps", str(args.other_rps)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(1.0)
    return proc


def stop_other(proc: subprocess.Popen, out: Path) -> list[tuple[float, int]]:
    """Stop the second job; (time, status) of each of its answers."""
    out.with_suffix(".stop").touch()
    stdout, _ = proc.communicate(timeout=60)
    return [tuple(a) for a in json.loads(stdout.strip().splitlines()[-1])["answers"]]


# ---------------------------------------------------------------------------------------------- driver


def phases(chosen: list[dict], parallel: bool) -> list[list[dict]]:
    """One by one; or imitate's setups at once, then the baselines at once."""
    if not parallel:
        return [[s] for s in chosen]
    groups = [[s for s in chosen if s["kind"] == "imitate"], [s for s in chosen if s["kind"] != "imitate"]]
    return [g for g in groups if g]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["utilisation", "short", "shared"], default="utilisation")
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--tpm", type=int, help="default: 1.5x what --rpm needs, so the RPM bucket binds")
    parser.add_argument("--seconds", type=float, help="run length a perfect client needs (240; short: 30; shared: 180)")
    parser.add_argument("--latency", type=float, help="fake teacher latency, seconds (0.3; shared: 0.2)")
    parser.add_argument("--jitter", type=float, help="plus uniform random 0..jitter seconds (0.7; shared: 0)")
    parser.add_argument("--other-rps", type=float, help="shared: the other job's requests a second (half the RPM)")
    parser.add_argument("--pause", type=float, default=1.0, help="baseline 2's fixed pause after an error")
    parser.add_argument("--only", help="comma-separated setup names to run (substring match)")
    parser.add_argument("--parallel", action="store_true", help="imitate's setups at once, then the baselines")
    parser.add_argument("--child", choices=["baseline-1", "baseline-2"], help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shared = args.scenario == "shared"
    seconds = {"short": 30.0, "shared": 180.0}.get(args.scenario, 240.0)
    defaults = {"seconds": seconds, "latency": 0.2 if shared else 0.3, "jitter": 0.0 if shared else 0.7,
                "other_rps": args.rpm / 120 if shared else 0.0}  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tpm is None:
        args.tpm = int(1.5 * args.rpm * request_tokens(question(99_999)))
    return args


def checks(r: dict, scenario: str) -> dict[str, bool]:
    if scenario == "short":
        return {"ideal time / T >= 0.95": r["time_ratio"] >= 0.95, "0 lost": r["lost"] == 0, "0 x 429": r["429"] == 0}
    return {"ok/ideal >= 0.97": r["utilisation"] >= 0.97, "0 lost": r["lost"] == 0,
            "429s <= 2 %": r["share_429"] <= 0.02}  # fmt: skip


def report(results: list[dict], args: argparse.Namespace, rows: int) -> list[str]:
    """Prints the table and the verdicts; returns the failed checks."""
    extra = {"short": " ideal time / T |", "shared": " other job ok (its pace) |"}.get(args.scenario, "")
    head = "| setup | limits RPM/TPM | rows ok | lost | requests | 429s | 429 share | T (s) | ideal | ok / ideal |"
    print(f"\n{head}{extra}")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if extra else ""))
    for r in results:
        more = {"short": f" **{r['time_ratio']:.3f}** |", "shared": f" {r['other_ok']} ({r['other_share'] or 0:.3f}) |"}
        print(f"| {r['name']} | {r['limits']} | {r['ok']} | {r['lost']} ({r['lost'] / rows:.0%}) | {r['requests']} | "
              f"{r['429']} | {r['share_429']:.1%} | {r['elapsed']:.1f} | {r['ideal']:.0f} | "
              f"**{r['utilisation']:.3f}** |{more.get(args.scenario, '')}")  # fmt: skip
    for r in results:
        first = f"{r['first']:.1f}" if r["first"] is not None else "-"
        print(f"- {r['name']}: first row after {first} s; errors seen by the client: {r['errors'] or 'none'}; "
              f"fake teacher CPU {r['server_cpu']:.1f} s")  # fmt: skip
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    failed = []
    for r in results:
        if r["kind"] != "imitate":
            continue
        verdicts = checks(r, args.scenario)
        print(f"{r['name']}: " + ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in verdicts.items()))
        failed += [f"{r['name']} {k}" for k, v in verdicts.items() if not v]
    return failed


def main() -> None:
    args = parse_args()
    if args.child:
        run_baseline(args)
        return

    left_rpm = args.rpm - 60 * args.other_rps  # what a second job on the key leaves (shared)
    rows = int(args.rpm + left_rpm * args.seconds / 60)
    wanted = args.only.split(",") if args.only else (["imitate"] if args.scenario != "utilisation" else None)
    chosen = [s for s in setups(args.rpm, args.tpm) if not wanted or any(k in s["name"] for k in wanted)]
    other = f", a second job on the key sending {args.other_rps:g}/s" if args.other_rps else ""
    print(f"harvest {args.scenario}: fake teacher {args.rpm} RPM / {args.tpm} TPM (RPM binds), latency "
          f"{args.latency:g}-{args.latency + args.jitter:g} s{other}, {rows} rows per setup (= ideal at "
          f"{args.seconds:g} s: burst {args.rpm} + refill {rows - args.rpm}), {len(chosen)} setups "
          f"{'imitate at once, then baselines at once' if args.parallel else 'one by one'}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="imitate-util-") as d:
        tmp = Path(d)
        src = tmp / "prompts.jsonl"
        write_input(src, rows)
        results = []
        for group in phases(chosen, args.parallel):
            with ThreadPoolExecutor(max_workers=len(group)) as pool:
                results += list(pool.map(lambda s: run_setup(s, args, rows, src, tmp), group))
    if report(results, args, rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
