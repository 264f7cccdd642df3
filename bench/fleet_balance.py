"""How a teacher fleet shares the work: one harvest against three fake replicas of different speeds (each in its
own process), then the same with the medium one killed mid-run, against the fast replica alone as the baseline.

    flock /tmp/imitate-bench.lock .venv/bin/python bench/fleet_balance.py [--rows 1500] [--concurrency 8]
        [--latencies 0.05,0.15,0.45] [--kill-after 2.0]

Each replica serves at most `concurrency` requests at once (the teacher's max_concurrency is per replica), so
its capacity is concurrency / latency rows per second and the ideal share of a replica is its capacity over the
fleet's (also given at the latency the client measured, a moving average: on a busy machine the fakes answer late).
Printed per run: each replica's rows (from the records' provenance.replica), share, ideal shares, and the
run's rows/s as a ratio to the fast replica alone (ideal ratio: the fleet's capacity over the fast one's). The
dying run also checks that no row was lost or paid twice (the ledger: one billed attempt per row).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import write_prompts  # noqa: E402

from imitate.config import load_config  # noqa: E402
from imitate.harvest.ledger import BILLED, ENTRY, LEDGER  # noqa: E402
from imitate.harvest.run import harvest  # noqa: E402
from imitate.records import read_jsonl  # noqa: E402
from imitate.teacher.fake import FakeTeacherServer  # noqa: E402


def config(urls: list[str], concurrency: int):
    key = (
        f"harvest.teachers.0.base_urls=[{', '.join(urls)}]"
        if len(urls) > 1
        else f"harvest.teachers.0.base_url={urls[0]}"
    )
    return load_config(
        None,
        [
            key,
            "harvest.teachers.0.name=fleet",
            f"harvest.teachers.0.max_concurrency={concurrency}",
            "harvest.params.max_tokens=64",
            "harvest.preset=none",
            "harvest.retry.base_delay_s=0.05",
            "harvest.retry.max_delay_s=2",
            "harvest.retry.replica_backoff_s=1",
        ],
    )


async def run(urls: list[str], src: Path, out: Path, concurrency: int, kill=None) -> dict:
    killer = asyncio.create_task(kill()) if kill else None
    started = time.monotonic()
    outcome = await harvest(config(urls, concurrency), str(src), out, progress="quiet")
    elapsed = time.monotonic() - started
    if killer:
        await killer
    records = [r for s in sorted(out.glob("shard-*.jsonl")) for r in read_jsonl(s)]
    data = (out / LEDGER).read_bytes()
    billed = Counter(key for kind, _t, _s, _u, key in ENTRY.iter_unpack(data) if kind == BILLED)
    by_replica = Counter(r.provenance.replica or urls[0] for r in records)
    return {
        "error": outcome.error.one_line() if outcome.error else None,
        "ok": outcome.manifest["totals"]["ok"],
        "rows_per_s": len(records) / elapsed,
        "elapsed_s": elapsed,
        "by_replica": [by_replica[u] for u in urls],
        "billed_once": len(billed) == len(records) and all(v == 1 for v in billed.values()),
        "replicas": outcome.manifest["teachers"]["fleet"].get("replicas"),
    }


def table(name: str, result: dict, latencies: list[float], concurrency: int, baseline: float, killed=None) -> str:
    capacity = [concurrency / lat for lat in latencies]
    total = sum(result["by_replica"])
    lines = [f"{name}: {result['ok']} ok in {result['elapsed_s']:.1f} s, {result['rows_per_s']:.0f} rows/s = "
             f"{result['rows_per_s'] / baseline:.2f}x the fast replica alone (ideal "
             f"{sum(capacity) / capacity[0]:.2f}x); every row billed once: {result['billed_once']}"]  # fmt: skip
    # what the client measured (a moving average): on a busy machine the fake processes answer later than asked
    measured = [r["latency_s"] or lat for r, lat in zip(result["replicas"], latencies, strict=True)]
    at_measured = [concurrency / lat for lat in measured]
    lines.append("| replica | latency | measured | rows | share | ideal share | ideal at measured |")
    lines.append("|---|---|---|---|---|---|---|")
    for i, (lat, rows) in enumerate(zip(latencies, result["by_replica"], strict=True)):
        note = f" (killed: out {result['replicas'][i]['times_out']}x, {result['replicas'][i]['failed']} failed)"
        lines.append(f"| {i}{note if i == killed else ''} | {lat * 1000:.0f} ms | {measured[i] * 1000:.0f} ms | "
                     f"{rows} | {rows / total:.3f} | {capacity[i] / sum(capacity):.3f} | "
                     f"{at_measured[i] / sum(at_measured):.3f} |")  # fmt: skip
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    latencies = [float(x) for x in args.latencies.split(",")]
    servers = [FakeTeacherServer(process=True, latency_s=lat) for lat in latencies]
    for s in servers:
        s.start()
    try:
        urls = [s.base_url for s in servers]
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "q.jsonl"
            write_prompts(src, args.rows)
            alone = await run(urls[:1], src, Path(tmp) / "alone", args.concurrency)
            fleet = await run(urls, src, Path(tmp) / "fleet", args.concurrency)
            for s in servers:
                s.reset()

            async def kill_medium() -> None:
                await asyncio.sleep(args.kill_after)
                await asyncio.to_thread(servers[1].stop)

            dying = await run(urls, src, Path(tmp) / "dying", args.concurrency, kill_medium)
    finally:
        for s in servers:
            s.stop()
    base = alone["rows_per_s"]
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()}, rows {args.rows}, "
          f"max_concurrency {args.concurrency} per replica; fast replica alone: {base:.0f} rows/s")  # fmt: skip
    print(table("three speeds", fleet, latencies, args.concurrency, base))
    print(table(f"medium killed after {args.kill_after} s", dying, latencies, args.concurrency, base, killed=1))
    print(json.dumps({"alone": alone, "fleet": fleet, "dying": dying}, default=str))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1500)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--latencies", default="0.05,0.15,0.45", help="seconds per answer of each replica, fast first")
    p.add_argument("--kill-after", type=float, default=2.0, help="seconds into the dying run the medium one dies")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
