"""A second job on the same API key, for `bench/harvest_utilisation.py --scenario shared`: it sends `--rps`
chat requests a second to the fake teacher, one at a random moment of every 1/rps s slot, without waiting for
the answers, until the file `--stop` appears; a 429 is its own loss (it keeps its pace). Then it prints one JSON
line: the wall-clock time and status of every answer.

    .venv/bin/python bench/paced_client.py --base-url http://127.0.0.1:PORT/v1 --rps 10 --stop /tmp/stop
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import aiohttp

MAX_TOKENS = 256


async def run(base_url: str, rps: float, stop: Path, seed: int) -> list[tuple[float, int]]:
    rng = random.Random(seed)
    answers: list[tuple[float, int]] = []
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": "Bearer sk-bench-not-a-key"}

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        body = {
            "model": "fake-teacher",
            "messages": [{"role": "user", "content": f"Other job {i}: why does {i} matter for counting?"}],
            "max_tokens": MAX_TOKENS,
        }
        async with session.post(url, json=body, headers=headers) as response:
            await response.read()
            answers.append((time.time(), response.status))

    tasks: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start, i = time.monotonic(), 0
        while not stop.exists():
            await asyncio.sleep(max(0.0, start + (i + rng.random()) / rps - time.monotonic()))
            task = asyncio.create_task(one(session, i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.gather(*tasks)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--rps", type=float, default=10.0)
    parser.add_argument("--stop", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    answers = asyncio.run(run(args.base_url, args.rps, args.stop, args.seed))
    print(json.dumps({"answers": answers}), flush=True)


if __name__ == "__main__":
    main()
