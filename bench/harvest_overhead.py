"""How many requests per second the harvester itself can drive: unlimited, zero-latency fake teacher.

    .venv/bin/python bench/harvest_overhead.py [--rows 10000] [--repeat 2] [--profile]

The fake teacher runs in its own process with no limits, no latency and no faults, so every client below is
CPU-bound on its own side. Each client runs in a fresh subprocess (imports done before the clock starts) on the
same input file, and they alternate (baseline, imitate, baseline, imitate, ...) so that a noisy neighbour hurts
both alike; the ratio within a round is the number that survives noise.

- baseline: the straightforward harvester a user writes first: AsyncOpenAI with its default retries,
            asyncio.Semaphore(64), asyncio.gather over every row, one JSON line written per answer.
- imitate:  `imitate.harvest.run.harvest` (the `imitate harvest` entry point) with its defaults (the `aiohttp`
            transport, journal, limiter with no limits configured), preset `none` so that both send the same
            requests.
- imitate-sdk (with --sdk): the same with `TeacherClient(transport="sdk")`, to show what aiohttp buys.

`--profile` runs imitate once more under cProfile and prints where its CPU goes, grouped by layer.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import cpu_seconds, write_prompts  # noqa: E402

MAX_TOKENS = 256
CONCURRENCY = 64


# ---------------------------------------------------------------------------------------------- the clients


async def baseline(base_url: str, input_path: str, out_path: str) -> dict:
    """Baseline (1), as a user writes it: SDK defaults (2 retries), a semaphore, gather, write as answers come."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench-not-a-key")
    with open(input_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    sem = asyncio.Semaphore(CONCURRENCY)
    lost = 0
    start = time.perf_counter()
    with open(out_path, "w", encoding="utf-8") as out:

        async def one(row: dict) -> None:
            nonlocal lost
            async with sem:
                try:
                    r = await client.chat.completions.create(
                        model="fake-teacher",
                        messages=[{"role": "user", "content": row["question"]}],
                        max_tokens=MAX_TOKENS,
                    )
                except openai.OpenAIError:
                    lost += 1
                    return
                answer = {"id": row["id"], "question": row["question"], "answer": r.choices[0].message.content}
                out.write(json.dumps(answer) + "\n")

        await asyncio.gather(*(one(row) for row in rows))
    wall = time.perf_counter() - start
    await client.close()
    return {"ok": len(rows) - lost, "lost": lost, "wall": wall}


def imitate_config(base_url: str, *extra: str):
    from imitate.config import load_config

    return load_config(
        None,
        [
            f"harvest.teachers.0.base_url={base_url}",
            "harvest.teachers.0.model=fake-teacher",
            f"harvest.params.max_tokens={MAX_TOKENS}",
            "harvest.preset=none",
            *extra,
        ],
    )


async def imitate(base_url: str, input_path: str, out_path: str, transport: str | None = None) -> dict:
    from imitate.harvest.run import harvest
    from imitate.teacher.client import TeacherClient

    cfg = imitate_config(base_url)
    clients = None
    if transport is not None:
        t = cfg.harvest.teachers[0]
        clients = {t.name: TeacherClient(t.base_url, timeout=t.timeout_s, transport=transport)}
    start = time.perf_counter()
    outcome = await harvest(cfg, input_path, Path(out_path), progress="quiet", clients=clients)
    wall = time.perf_counter() - start
    if clients:
        for c in clients.values():
            await c.aclose()
    run = outcome.manifest["this_run"]
    return {"ok": run["ok"], "lost": run["failed"], "wall": wall}


ROLES = {
    "baseline": baseline,
    "imitate": imitate,
    "imitate-sdk": lambda *a: imitate(*a, transport="sdk"),
}


def child(role: str, base_url: str, input_path: str, out_path: str, profile: str | None) -> None:
    import openai  # noqa: F401 — import cost is start-up, not throughput

    import imitate.harvest.run
    import imitate.teacher.client  # noqa: F401

    prof = cProfile.Profile() if profile else None
    cpu = time.process_time()
    if prof:
        prof.enable()
    result = asyncio.run(ROLES[role](base_url, input_path, out_path))
    if prof:
        prof.disable()
        prof.dump_stats(profile)
    result["cpu"] = time.process_time() - cpu
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- the profile

GROUPS = [  # first match wins: (label, substrings of the profile's file name / function)
    ("socket syscalls (send/recv/poll)", ("_socket.socket", "select.poll", "select.epoll")),
    ("HTTP: aiohttp (session, connector, parser, streams)", ("aiohttp/",)),
    ("HTTP: yarl/multidict (URLs, headers)", ("yarl/", "multidict/")),
    ("asyncio event loop, tasks, futures", ("asyncio/", "_asyncio", "selectors.py", "events.py")),
    ("journal: sqlite", ("sqlite3",)),
    ("journal: fsync / file writes", ("posix.fsync", "BufferedWriter", "FileIO", "_io.")),
    ("limiter", ("imitate/teacher/limiter",)),
    ("teacher client + reply parsing", ("imitate/teacher/client", "imitate/teacher/reply")),
    ("harvest: collector/journal/plan/run/sources", ("imitate/harvest/",)),
    ("records/prompts (imitate)", ("imitate/",)),
    ("pydantic (validate, dump)", ("pydantic",)),
    ("json encode/decode", ("json/", "_json")),
    ("tenacity", ("tenacity/",)),
    ("hashlib", ("hashlib", "_blake2", "openssl")),
]


def profile_table(path: str, rows: int) -> str:
    stats = pstats.Stats(path)
    totals: dict[str, float] = {}
    for (filename, _, func), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{filename}:{func}"
        label = next((lab for lab, keys in GROUPS if any(k in where for k in keys)), "other (builtins, typing, ...)")
        totals[label] = totals.get(label, 0.0) + tottime
    total = sum(totals.values())
    lines = [f"| where imitate's CPU goes (cProfile, {rows} rows) | share | µs/row |", "|---|---:|---:|"]
    for label, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {label} | {t / total:.0%} | {t / rows * 1e6:.0f} |")
    top = pstats.Stats(path)
    top.sort_stats("tottime")
    return "\n".join(lines) + f"\n(total {total:.1f} s under cProfile; cProfile inflates Python-heavy code)\n"


# ---------------------------------------------------------------------------------------------- driver


def run_child(role: str, base_url: str, input_path: Path, tmp: Path, profile: str | None = None) -> dict:
    out = tmp / f"out-{role}-{time.monotonic_ns()}"
    cmd = [sys.executable, __file__, "--child", role, "--base-url", base_url, "--input", str(input_path)]
    cmd += ["--out", str(out) + (".jsonl" if role == "baseline" else "")]
    if profile:
        cmd += ["--profile-to", profile]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=2, help="rounds of (baseline, imitate)")
    parser.add_argument("--sdk", action="store_true", help="also run imitate on the SDK transport")
    parser.add_argument("--profile", action="store_true", help="profile imitate once more and group the CPU")
    parser.add_argument("--child", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.base_url, args.input, args.out, args.profile_to)
        return

    from imitate.teacher.fake import FakeTeacherServer

    roles = ["baseline", "imitate"] + (["imitate-sdk"] if args.sdk else [])
    print(f"harvest overhead: {os.cpu_count()} cpus, {args.rows} rows, zero-latency unlimited fake in its own "
          f"process, {args.repeat} round(s) of {', '.join(roles)}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="imitate-bench-") as d, FakeTeacherServer(process=True) as server:
        tmp = Path(d)
        src = tmp / "prompts.jsonl"
        write_prompts(src, args.rows)
        results: dict[str, list[dict]] = {r: [] for r in roles}
        print("| round | client | rows ok | lost | req/s | client CPU µs/row | server CPU µs/row | vs baseline |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        for rnd in range(1, args.repeat + 1):
            for role in roles:
                server_cpu = cpu_seconds(server.pid)
                r = run_child(role, server.base_url, src, tmp)
                r["server_cpu"] = cpu_seconds(server.pid) - server_cpu
                r["rate"] = r["ok"] / r["wall"]
                results[role].append(r)
                ratio = r["rate"] / results["baseline"][-1]["rate"]
                print(f"| {rnd} | {role} | {r['ok']} | {r['lost']} | {r['rate']:.0f} | "
                      f"{r['cpu'] / args.rows * 1e6:.0f} | {r['server_cpu'] / args.rows * 1e6:.0f} | "
                      f"{ratio:.2f}x |", flush=True)  # fmt: skip
        best = {role: max(x["rate"] for x in rs) for role, rs in results.items()}
        pairs = list(zip(results["baseline"], results["imitate"], strict=True))
        ratios = [i["rate"] / b["rate"] for b, i in pairs]
        cpu_ratios = [b["cpu"] / i["cpu"] for b, i in pairs]  # rows per CPU-second: what one free core would do
        print("\nbest req/s: " + ", ".join(f"{k} {v:.0f}" for k, v in best.items()))
        print(f"imitate / baseline CPU per row, per round: {', '.join(f'{x:.2f}x' for x in cpu_ratios)}; "
              f"one free core would do ~{1e6 / min(i['cpu'] / args.rows * 1e6 for i in results['imitate']):.0f} "
              f"req/s of imitate")  # fmt: skip
        print(f"imitate / baseline per round: {', '.join(f'{x:.2f}x' for x in ratios)} (target >= 3.5x); "
              f"imitate >= 1,200 req/s: {'yes' if best['imitate'] >= 1200 else 'NO'}; "
              f"load average after {os.getloadavg()[0]:.2f}")  # fmt: skip
        if args.profile:
            prof = str(tmp / "imitate.prof")
            run_child("imitate", server.base_url, src, tmp, profile=prof)
            print("\n" + profile_table(prof, args.rows))
            stats = pstats.Stats(prof)
            stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
