"""How many chat completions per second the fake teacher can serve on this machine.

    .venv/bin/python bench/fake_teacher_ceiling.py [--seconds 5] [--concurrency 64]

The server runs in its own process (`FakeTeacherServer(process=True)`), so the load generator does not share
its GIL. Three load generators, each run alone for the same duration with varied prompts and keep-alive:

- raw:     pre-encoded HTTP/1.1 requests over plain asyncio sockets, the cheapest possible client, so the
           number is the server's ceiling;
- aiohttp: a bare aiohttp.ClientSession posting JSON and decoding the answer, what the transport alone costs;
- teacher-aiohttp / teacher-sdk: imitate.teacher.client.TeacherClient on each transport (`aiohttp`, the default;
           `sdk`, the openai SDK's raw-response API).

The machine may be shared: "req/s per server core" (rate / server CPU share) is the number that survives noise.

`--hostile endless|bomb|endless,bomb` measures instead what hostile answers cost the client: 256 concurrent
requests whose answers never end (`endless`) or inflate to 1 GiB (`bomb`), against one TeacherClient at its
default `max_response_bytes`; prints the rows' outcomes and the client's peak RSS growth (/proc, every 20 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aiohttp
from benchutil import cpu_seconds, rss_mb

from imitate.errors import TeacherError
from imitate.records import GenerationParams, Message
from imitate.teacher.client import TeacherClient
from imitate.teacher.fake import FakeTeacherServer


def _body(i: int) -> dict:
    question = f"Question {i}: why does the number {i} matter for arithmetic and for counting things?"
    return {"model": "fake-teacher", "messages": [{"role": "user", "content": question}], "max_tokens": 256}


async def _drive(seconds: float, concurrency: int, one_request) -> float:
    """Run `concurrency` loops calling `one_request(i)` for `seconds`; returns completed requests per second."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = w
        while time.perf_counter() < deadline:
            await one_request(i)
            done += 1
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done / (time.perf_counter() - start)


async def raw_client(host: str, port: int, seconds: float, concurrency: int) -> float:
    def request(i: int) -> bytes:
        payload = json.dumps(_body(i)).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n\r\n"
        )
        return head.encode() + payload

    prepared = [request(i) for i in range(4096)]
    conns = [await asyncio.open_connection(host, port) for _ in range(concurrency)]
    slots = asyncio.Queue()
    for conn in conns:
        slots.put_nowait(conn)

    async def one(i: int) -> None:
        reader, writer = await slots.get()
        writer.write(prepared[i % len(prepared)])
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200") or not body:
            raise RuntimeError(head.decode())
        slots.put_nowait((reader, writer))

    rate = await _drive(seconds, concurrency, one)
    for _, writer in conns:
        writer.close()
    return rate


async def aiohttp_client(base_url: str, seconds: float, concurrency: int) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:
        url = base_url + "/chat/completions"

        async def one(i: int) -> None:
            async with http.post(url, json=_body(i)) as response:
                response.raise_for_status()
                await response.json()

        return await _drive(seconds, concurrency, one)


async def teacher_client(base_url: str, seconds: float, concurrency: int, transport: str) -> float:
    params = GenerationParams(max_tokens=256)
    async with TeacherClient(base_url, timeout=30, max_connections=concurrency, transport=transport) as client:

        async def one(i: int) -> None:
            messages = [Message(role="user", content=_body(i)["messages"][0]["content"])]
            await client.chat(messages, model="fake-teacher", params=params)

        return await _drive(seconds, concurrency, one)


async def hostile(base_url: str, faults: list[str], concurrency: int = 256) -> tuple[dict[str, int], float]:
    """(outcome counts, peak RSS growth in MB) for `concurrency` requests cycling through `faults`."""
    base = peak = rss_mb(os.getpid()) or 0.0
    async with TeacherClient(base_url, timeout=120, max_connections=concurrency) as client:

        async def one(i: int) -> str:
            messages = [Message(role="user", content=f"q{i} [[fault:{faults[i % len(faults)]}]]")]
            try:
                await client.chat(messages, model="fake-teacher", params=GenerationParams())
            except TeacherError as exc:
                return type(exc).__name__
            return "ok"

        calls = asyncio.gather(*(one(i) for i in range(concurrency)))
        while not calls.done():
            peak = max(peak, rss_mb(os.getpid()) or 0.0)
            await asyncio.wait([calls], timeout=0.02)
    outcomes: dict[str, int] = {}
    for outcome in calls.result():
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes, peak - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--hostile", metavar="FAULTS", help="e.g. endless,bomb: peak client RSS under those answers")
    args = parser.parse_args()
    if args.hostile:  # one scenario per process: RSS a previous one left behind would hide this one's growth
        with FakeTeacherServer(process=True) as server:
            start = time.perf_counter()
            outcomes, growth = asyncio.run(hostile(server.base_url, args.hostile.split(",")))
            print(f"256 x {args.hostile}: {outcomes}, peak client RSS growth {growth:.0f} MB "
                  f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
        return
    print(f"fake teacher ceiling: {os.cpu_count()} cpus, {args.concurrency} keep-alive connections, "
          f"{args.seconds:g}s per client, server in its own process")  # fmt: skip
    with FakeTeacherServer(process=True) as server:
        host, port = server.base_url.split("//")[1].split("/")[0].split(":")
        clients = {
            "raw": lambda: raw_client(host, int(port), args.seconds, args.concurrency),
            "aiohttp": lambda: aiohttp_client(server.base_url, args.seconds, args.concurrency),
            **{
                f"teacher-{t}": (lambda t=t: teacher_client(server.base_url, args.seconds, args.concurrency, t))
                for t in ("aiohttp", "sdk")
            },
        }
        for name, client in clients.items():
            server_cpu, client_cpu, wall = cpu_seconds(server.pid), time.process_time(), time.perf_counter()
            rate = asyncio.run(client())
            wall = time.perf_counter() - wall
            server_busy = (cpu_seconds(server.pid) - server_cpu) / wall
            client_busy = (time.process_time() - client_cpu) / wall
            per_core = rate / server_busy if server_busy else float("nan")
            print(
                f"  {name:15} {rate:6.0f} req/s   server cpu {server_busy:4.0%} ({per_core:5.0f} req/s per server core)"
                f"   client cpu {client_busy:4.0%}"
            )


if __name__ == "__main__":
    main()
