"""The fake teacher's Batch API: `/v1/files` (upload, metadata, content) and `/v1/batches` (create, get,
cancel). A batch walks validating -> in_progress -> finalizing -> completed (or cancelled), pausing `delay_s`
before each step; each line is answered by the `answer` callable FakeTeacher hands over (the same answer as an
online chat request), so this module needs nothing of the app but what it is given."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from imitate.teacher.fake.http import Request, Response, invalid, json_response, multipart

Answer = Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]  # a chat request body -> (status, body)


class BatchEndpoints:
    """Files and batches, answered with `answer`, numbered with `next_id`, run as tasks by `spawn`; `stats` is
    the app's counters (this adds `batch_lines`)."""

    def __init__(
        self,
        answer: Answer,
        next_id: Callable[[str], str],
        spawn: Callable[[Awaitable[None]], asyncio.Task],
        stats: Callable[[], dict[str, Any]],
        delay_s: float,
    ):
        self._answer, self._next_id, self._spawn, self._stats = answer, next_id, spawn, stats
        self.delay_s = delay_s
        self.files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self.batches: dict[str, dict[str, Any]] = {}

    def route(self, req: Request, path: str) -> Response | None:
        """The answer to a files or batches request; None when `path` is neither."""
        if (req.method, path) == ("POST", "/files"):
            return self._upload(req)
        if (req.method, path) == ("POST", "/batches"):
            return self._create_batch(req)
        if req.method == "GET" and (match := re.fullmatch(r"/files/([\w-]+)(/content)?", path)):
            if match.group(1) not in self.files:
                return invalid(404, f"No such File object: {match.group(1)}")
            meta, data = self.files[match.group(1)]
            return (
                Response(200, data, content_type="application/octet-stream") if match[2] else json_response(200, meta)
            )
        if match := re.fullmatch(r"/batches/([\w-]+)(/cancel)?", path):
            if match.group(1) not in self.batches:
                return invalid(404, f"No such batch: {match.group(1)}")
            return self._cancel_batch(match.group(1)) if match[2] else json_response(200, self.batches[match.group(1)])
        return None

    def _store_file(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        meta = {"id": self._next_id("file-"), "object": "file", "bytes": len(data), "filename": filename}
        meta |= {"created_at": int(time.time()), "purpose": purpose, "status": "processed"}
        self.files[meta["id"]] = (meta, data)
        return meta

    def _upload(self, req: Request) -> Response:
        try:
            parts = multipart(req.body, req.headers.get("content-type", ""))
            filename, data = parts["file"]
            purpose = parts.get("purpose", (None, b"batch"))[1].decode()
        except (ValueError, KeyError):
            return invalid(400, "expected multipart/form-data with file and purpose")
        return json_response(200, self._store_file(filename or "upload.jsonl", purpose, data))

    def _create_batch(self, req: Request) -> Response:
        try:
            payload = json.loads(req.body)
            file_id, endpoint = payload["input_file_id"], payload["endpoint"]
        except (ValueError, KeyError, TypeError):
            return invalid(400, "expected input_file_id and endpoint")
        if file_id not in self.files or endpoint != "/v1/chat/completions":
            return invalid(400, f"unknown input file {file_id!r} or unsupported endpoint {endpoint!r}")
        stamps = "in_progress_at finalizing_at completed_at failed_at expired_at cancelling_at cancelled_at"
        batch = {"id": self._next_id("batch_"), "object": "batch", "endpoint": endpoint, "errors": None}
        batch |= {"input_file_id": file_id, "completion_window": payload.get("completion_window", "24h")}
        batch |= {"status": "validating", "output_file_id": None, "error_file_id": None}
        batch |= {"created_at": int(time.time()), "expires_at": int(time.time()) + 86400}
        batch |= dict.fromkeys(stamps.split()) | {"metadata": payload.get("metadata")}
        batch["request_counts"] = {"total": 0, "completed": 0, "failed": 0}
        self.batches[batch["id"]] = batch
        self._spawn(self._run_batch(batch))
        return json_response(200, batch)

    def _cancel_batch(self, batch_id: str) -> Response:
        batch = self.batches[batch_id]
        if batch["status"] not in ("validating", "in_progress", "finalizing"):
            return invalid(409, f"Cannot cancel a batch with status '{batch['status']}'.")
        batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
        return json_response(200, batch)

    async def _run_batch(self, batch: dict[str, Any]) -> None:
        """validating -> in_progress -> finalizing -> completed (or cancelled), batch_delay_s per step."""
        await asyncio.sleep(self.delay_s)
        if batch["status"] == "cancelling":
            batch["status"], batch["cancelled_at"] = "cancelled", int(time.time())
            return
        batch["status"], batch["in_progress_at"] = "in_progress", int(time.time())
        lines = [line for line in self.files[batch["input_file_id"]][1].decode().splitlines() if line.strip()]
        results = [self._batch_line(line, n) for n, line in enumerate(lines, 1)]
        await asyncio.sleep(self.delay_s)
        if batch["status"] != "cancelling":
            batch["status"], batch["finalizing_at"] = "finalizing", int(time.time())
        for ok, kind in ((True, "output"), (False, "error")):
            chosen = [json.dumps(entry) + "\n" for entry, good in results if good is ok]
            if chosen:
                meta = self._store_file(f"{batch['id']}_{kind}.jsonl", "batch_output", "".join(chosen).encode())
                batch[f"{kind}_file_id"] = meta["id"]
        completed = sum(good for _, good in results)
        batch["request_counts"] = {"total": len(results), "completed": completed, "failed": len(results) - completed}
        done = "cancelled" if batch["status"] == "cancelling" else "completed"
        batch["status"], batch[f"{done}_at"] = done, int(time.time())

    def _batch_line(self, line: str, n: int) -> tuple[dict[str, Any], bool]:
        """One line in the official batch output format, and whether it succeeded."""
        self._stats()["batch_lines"] += 1
        entry: dict[str, Any] = {"id": self._next_id("batch_req_"), "custom_id": None, "response": None}
        try:
            item = json.loads(line)
            entry["custom_id"] = item.get("custom_id")
            status, obj = self._answer(item["body"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return entry | {"error": {"code": "invalid_request", "message": f"line {n}: not a batch request"}}, False
        entry["response"] = {"status_code": status, "request_id": self._next_id("req_"), "body": obj}
        return entry | {"error": None}, status == 200
