"""MinHash near-duplicate removal: `imitate curate` (its near_duplicate gate) against a plain datasketch script doing
the same dedup, on the same synthetic records, in the same run.

    .venv/bin/python bench/curate_dedup.py --rows 100000
    .venv/bin/python bench/curate_dedup.py --rows 1000000          # ~30 min on 2 shared cores (plain: ~20 of them)

Input: imitate records (JSONL) with answers of 60-140 words drawn from a 20,000-word vocabulary; 12 % of the rows
are planted copies of a recent row with 0-5 words of the answer replaced and its case and punctuation changed, so
that some copies sit well above the threshold and some around it. Both sides dedup the same text (question +
answer, the gate's `conversation` field), with the same settings: Jaccard threshold 0.8, 128 permutations, 5-word
shingles of the normalised text (casefold, NFKC, punctuation to spaces), keeping the first row of each cluster.

- imitate: the real CLI in a child process, `imitate curate IN --out DIR` with every other gate off. It reads and
  validates each record, writes records.jsonl and dropped.jsonl (with reasons) and the manifest.
- plain: a child process running the datasketch recipe: json.loads per line, `MinHash(num_perm=128)` and
  `update()` per shingle, `MinHashLSH(threshold=0.8, num_perm=128)`, `query()` then `insert()` when nothing was
  found; writes the ids of the duplicates.

Each child is timed from start to exit, and its peak RSS is the kernel's `ru_maxrss` of the waited child. The
agreement is the share of rows both call the same thing (duplicate or not). Targets (issue 10): imitate faster
than the plain script, <= 1.5 GB peak RSS at 1M rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PLAIN = r"""
import json, re, sys, unicodedata
from datasketch import MinHash, MinHashLSH

NON_WORD = re.compile(r"[\W_]+")

def shingles(text, size=5):
    words = NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split()
    if len(words) <= size:
        return [" ".join(words)] if words else []
    return [" ".join(words[i : i + size]) for i in range(len(words) - size + 1)]

lsh = MinHashLSH(threshold=0.8, num_perm=128)
with open(sys.argv[1], encoding="utf-8") as src, open(sys.argv[2], "w") as dups:
    for line in src:
        row = json.loads(line)
        text = row["messages"][-1]["content"] + "\n" + row["response"]
        m = MinHash(num_perm=128)
        for s in shingles(text):
            m.update(s.encode("utf-8"))
        if lsh.query(m):
            dups.write(row["id"] + "\n")
        else:
            lsh.insert(row["id"], m)
"""

IMITATE_FLAGS = [
    "--keep-failed",
    "--keep-truncated",
    "--keep-refusals",
    "--min-words",
    "0",
    "--no-exact-dup",
    "--near-dup-threshold",
    "0.8",
    "--num-perm",
    "128",
    "--shingle",
    "5",
    "--shingle-unit",
    "word",
]


def write_rows(path: Path, rows: int, seed: int = 0) -> int:
    """Synthetic records with planted near-duplicates; returns how many were planted."""
    rng = random.Random(seed)
    vocab = [f"{rng.choice('bcdfghklmnprst')}{rng.choice('aeiou')}{i:x}" for i in range(20_000)]
    recent: list[tuple[str, list[str]]] = []  # the last 5,000 rows, for copies (bounded: the generator streams)
    planted = 0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            if recent and rng.random() < 0.12:
                question, words = rng.choice(recent)
                words = list(words)
                for _ in range(rng.randint(0, 5)):
                    words[rng.randrange(len(words))] = rng.choice(vocab)
                answer = " ".join(words).capitalize() + "!"
                planted += 1
            else:
                question = "Question: " + " ".join(rng.choices(vocab, k=8)) + "?"
                words = rng.choices(vocab, k=rng.randint(60, 140))
                answer = " ".join(words) + "."
                recent.append((question, words))
                if len(recent) > 5000:
                    recent.pop(rng.randrange(len(recent)))
            record = {
                "id": f"r{i}",
                "query": {"id": f"q{i}", "question": question},
                "messages": [{"role": "user", "content": question}],
                "response": answer,
                "provenance": {"teacher": "bench", "model": "synthetic", "base_url": "", "request_key": f"k{i}"},
            }
            f.write(json.dumps(record) + "\n")
    return planted


def run_child(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MB, exit code) of a child process."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        print(f"child failed ({proc.returncode}): {' '.join(cmd)}\n{err}", file=sys.stderr)
    return wall, usage.ru_maxrss / 1024, proc.returncode


def imitate_duplicates(dropped: Path) -> set[str]:
    out = set()
    with open(dropped, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["gate"] == "near_duplicate":
                out.add(row["record"]["id"])
    return out


def bench(rows: int, tmp: Path) -> dict:
    src = tmp / f"rows-{rows}.jsonl"
    t = time.monotonic()
    planted = write_rows(src, rows)
    print(f"{rows} rows ({planted} planted copies) written in {time.monotonic() - t:.0f} s", flush=True)
    out = tmp / f"curated-{rows}"
    ours = run_child([sys.executable, "-m", "imitate.cli", "curate", str(src), "--out", str(out), *IMITATE_FLAGS])
    print(f"imitate curate: {ours[0]:.1f} s, {ours[1]:.0f} MB", flush=True)
    plain_out = tmp / f"plain-{rows}.txt"
    plain = run_child([sys.executable, "-c", PLAIN, str(src), str(plain_out)])
    print(f"plain datasketch: {plain[0]:.1f} s, {plain[1]:.0f} MB", flush=True)
    a = imitate_duplicates(out / "dropped.jsonl")
    b = set(plain_out.read_text().split())
    agree = 1 - len(a ^ b) / rows
    result = {
        "rows": rows,
        "planted": planted,
        "imitate": {"s": ours[0], "rows_per_s": rows / ours[0], "peak_rss_mb": ours[1], "duplicates": len(a)},
        "plain": {"s": plain[0], "rows_per_s": rows / plain[0], "peak_rss_mb": plain[1], "duplicates": len(b)},
        "agreement": agree,
        "only_imitate": len(a - b),
        "only_plain": len(b - a),
    }
    print(json.dumps(result), flush=True)
    for p in (src, plain_out):
        p.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    args = parser.parse_args()
    print(f"curate dedup: rows {args.rows}, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="imitate-dedup-") as d:
        for rows in args.rows:
            results.append(bench(rows, Path(d)))
    print("| rows | side | rows/s | peak RSS | duplicates found | agreement |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in results:
        for side in ("imitate", "plain"):
            s = r[side]
            print(f"| {r['rows']:,} | {side} | {s['rows_per_s']:,.0f} | {s['peak_rss_mb']:,.0f} MB | "
                  f"{s['duplicates']:,} | {r['agreement']:.4%} |")  # fmt: skip


if __name__ == "__main__":
    main()
