"""Peak memory of `imitate harvest` over a long input: 1,000,000 prompts streamed against the fake teacher.

    .venv/bin/python bench/harvest_memory.py [--rows 1000000]      # ~35-60 min on 2 shared cores
    .venv/bin/python bench/harvest_memory.py --rows 50000          # what `make bench` runs

The input JSONL is written lazily to a temporary file. The fake teacher runs in its own process with no limits,
no latency and short answers (one body sentence). The harvester is the real CLI in a subprocess with
`--json-log`; its resident set size is sampled from /proc every `--sample-every` seconds and its peak is read
from the kernel when it exits (`ru_maxrss` of the waited child). Target (issue 4): peak RSS <= 300 MB at 1M rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import rss_mb, write_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--sample-every", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--keep", help="write the harvest output here instead of a temporary directory")
    args = parser.parse_args()

    from imitate.teacher.fake import FakeTeacherServer

    print(f"harvest memory: {args.rows} prompts, zero-latency unlimited fake with one-sentence answers, "
          f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="imitate-mem-") as d:
        tmp = Path(d)
        src = tmp / "prompts.jsonl"
        write_prompts(src, args.rows)
        out = Path(args.keep) if args.keep else tmp / "out"
        with FakeTeacherServer(process=True, sentences=1) as server:
            cmd = [sys.executable, "-m", "imitate.cli", "harvest", str(src), "--out", str(out), "--json-log"]
            cmd += ["--base-url", server.base_url, "--set", "harvest.preset=none"]
            cmd += ["--set", "harvest.params.max_tokens=128"]
            start = time.monotonic()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            progress: list[dict] = []

            def read_progress() -> None:  # the CLI prints one JSON progress line every 5 s
                assert proc.stderr is not None
                for line in proc.stderr:
                    if line.startswith('{"event": "progress"'):
                        progress.append(json.loads(line))

            reader = threading.Thread(target=read_progress, daemon=True)
            reader.start()
            samples: list[tuple[float, float, int]] = []  # (seconds, RSS MB, rows done at the last progress line)
            while proc.poll() is None:
                mb = rss_mb(proc.pid)
                if mb is not None:
                    samples.append((time.monotonic() - start, mb, progress[-1]["done"] if progress else 0))
                time.sleep(args.sample_every)
            reader.join(timeout=5)
            wall = time.monotonic() - start
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KB on Linux
        manifest = json.loads((out / "manifest.json").read_text())
    run = manifest["this_run"]
    print(f"exit {proc.returncode}: {run['ok']} ok, {run['failed']} failed, {run['requests']} requests in {wall:.0f} s "
          f"({run['ok'] / wall:.0f} rows/s)")  # fmt: skip
    print("\n| elapsed (s) | rows done | RSS (MB) |\n|---:|---:|---:|")
    marks = {round(len(samples) * f) for f in (0.02, 0.1, 0.25, 0.5, 0.75)} | {len(samples) - 1}
    for i in sorted(m for m in marks if 0 <= m < len(samples)):
        t, mb, done = samples[i]
        print(f"| {t:.0f} | {done} | {mb:.0f} |")
    sampled_peak = max(mb for _, mb, _ in samples) if samples else float("nan")
    verdict = "pass" if peak_mb <= 300 else "FAIL"
    print(f"\npeak RSS {peak_mb:.0f} MB (kernel ru_maxrss; sampled max {sampled_peak:.0f} MB): <= 300 MB {verdict}")
    if peak_mb > 300 or proc.returncode != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
