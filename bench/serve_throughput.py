"""`imitate serve` throughput: generated tokens/s with 16 concurrent clients vs the same server answering one
request at a time (one client sending its requests one after another), same SmolLM2-135M GGUF, same prompts,
same lengths (fixed `max_tokens` with `ignore_eos`, so every answer is exactly that long).

    flock /tmp/imitate-bench.lock .venv/bin/python bench/serve_throughput.py [--max-tokens 128] [--clients 16]

The server is the real command (`imitate serve MODEL --port 0 --max-batch 16`) in its own process; the clients
are one asyncio process on aiohttp. After one warm-up request, the sequential phase sends the P prompts one at a
time, then the concurrent phase has 16 clients send `--rounds` x P requests (each client takes the next prompt
as soon as its answer is complete, so requests join and leave the running batch all the time). Tokens/s =
completion tokens (from `usage`) / wall time of the phase; the server's /stats give its mean rows per step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
GGUF = Path(os.environ.get("IMITATE_MODEL_DIR", "~/.cache/imitate/models")).expanduser() / (
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)
TOPICS = (
    "a robot learning to paint", "the water cycle", "why leaves change colour", "a lighthouse keeper",
    "how bridges carry weight", "the first day at a new school", "a city garden", "how vaccines work",
    "a lost dog finding home", "the history of bread", "how a compiler works", "a storm at sea",
    "saving money as a student", "the moon landing", "how bees make honey", "a chess tournament",
)  # fmt: skip


def prompts(n: int) -> list[list[dict]]:
    return [
        [{"role": "user", "content": f"Write a detailed explanation about {TOPICS[i % len(TOPICS)]}."}]
        for i in range(n)
    ]


def start_server(model: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "imitate.cli", "serve", str(model), "--port", "0", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print("  server:", line.rstrip(), flush=True)
        m = re.search(r"on (http://\S+/v1)", line)
        if m:
            return proc, m.group(1)
    raise SystemExit(f"the server exited ({proc.wait()})")


async def ask(session: aiohttp.ClientSession, url: str, model: str, messages: list[dict], max_tokens: int) -> int:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    async with session.post(f"{url}/chat/completions", json=body) as r:
        data = await r.json()
        if r.status != 200:
            raise SystemExit(f"HTTP {r.status}: {data}")
        return data["usage"]["completion_tokens"]


async def phase(url: str, model: str, work: list[list[dict]], clients: int, max_tokens: int) -> dict:
    queue = list(reversed(work))
    done: list[int] = []
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:
        stats0 = await stats(session, url)

        async def client() -> None:
            while queue:
                done.append(await ask(session, url, model, queue.pop(), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
        stats1 = await stats(session, url)
    steps = stats1["steps"] - stats0["steps"]
    rows = (stats1["generated_tokens"] - stats0["generated_tokens"]) / max(1, steps)
    busy = stats1["step_s"] - stats0["step_s"]
    return {"requests": len(done), "tokens": sum(done), "wall_s": wall, "tok_s": sum(done) / wall,
            "rows_per_step": rows, "ms_per_step": 1000 * busy / max(1, steps), "engine_busy": busy / wall}  # fmt: skip


async def stats(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url.removesuffix("/v1") + "/stats") as r:
        return await r.json()


def start_profiler(pid: int, out: Path) -> subprocess.Popen:
    """py-spy sampling the server (idle threads left out) until SIGINT; collapsed stacks in `out`."""
    spy = Path(sys.executable).with_name("py-spy")
    cmd = [
        str(spy) if spy.exists() else "py-spy",
        "record",
        "--pid",
        str(pid),
        "--rate",
        "50",
        "--format",
        "raw",
        "-o",
        str(out),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(60)


async def run(args: argparse.Namespace, url: str, server_pid: int) -> dict:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/models") as r:
        model = (await r.json())["data"][0]["id"]
    work = prompts(args.prompts)
    await phase(url, model, work[:1], 1, 8)  # warm-up
    out = {}
    for name, clients, load in (("sequential", 1, work), ("concurrent", args.clients, work * args.rounds)):
        before = os.getloadavg()[0]
        profiler = start_profiler(server_pid, args.py_spy / f"{name}.txt") if args.py_spy else None
        out[name] = await phase(url, model, load, clients, args.max_tokens)
        if profiler:
            stop_profiler(profiler)
        out[name]["load"] = (before, os.getloadavg()[0])
        r = out[name]
        print(f"{name:10s} {clients:2d} client(s): {r['requests']} requests, {r['tokens']} tokens in "
              f"{r['wall_s']:.1f} s = {r['tok_s']:.1f} tok/s; {r['rows_per_step']:.1f} rows/step, "
              f"{r['ms_per_step']:.0f} ms/step, engine busy {r['engine_busy']:.0%}; "
              f"load {r['load'][0]:.2f} -> {r['load'][1]:.2f}", flush=True)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=GGUF)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="concurrent phase: requests = rounds x prompts")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--server-arg", action="append", default=[], help="extra `imitate serve` option (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--py-spy", type=Path, help="profile the server in each phase: DIR/<phase>.txt (collapsed)")
    args = ap.parse_args()
    extra = ["--max-batch", str(args.clients), *args.server_arg]
    print(f"serve throughput {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cpus, load average "
          f"{os.getloadavg()[0]:.2f}; {args.model.name}, max_tokens {args.max_tokens}, server {' '.join(extra)}",
          flush=True)  # fmt: skip
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(args.model, extra)
    try:
        out = asyncio.run(run(args, url, proc.pid))
    finally:
        proc.terminate()
        proc.wait(30)
    ratio = out["concurrent"]["tok_s"] / out["sequential"]["tok_s"]
    print(f"ratio concurrent / sequential: {ratio:.2f}x (floor 5x); concurrent {out['concurrent']['tok_s']:.1f} "
          f"tok/s (target 68)", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"model": str(args.model)}, **out}, default=str))


if __name__ == "__main__":
    main()
