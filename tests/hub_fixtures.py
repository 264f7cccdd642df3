"""A loopback fake of the Hugging Face Hub endpoints that `HfApi.create_repo` + `HfApi.upload_folder` use, for
the `imitate export --hub` test. huggingface_hub is pointed at it with `HF_ENDPOINT`.

What the installed huggingface_hub (2.x) calls, with Xet switched off (`HF_HUB_DISABLE_XET=1`: Xet storage is
a separate content-addressed service spoken by the `hf_xet` Rust client, which no loopback fake can stand in for;
the legacy Git LFS path it falls back to is the Hub's other, still supported, upload protocol):

    POST /api/repos/create                                  {"name", "organization", "type", "visibility"}
    POST /api/validate-yaml                                 the README.md front matter, checked before upload
    GET  /api/datasets/{ns}/{name}                          dataset_info: is an existing repo private?
    GET  /api/datasets/{ns}/{name}/tree/{rev}               listing for upload_folder(delete_patterns=...)
    POST /api/datasets/{ns}/{name}/preupload/{rev}          per file: uploadMode "regular" or "lfs"
    POST /datasets/{ns}/{name}.git/info/lfs/objects/batch   LFS batch: where to PUT each large/binary file
    PUT  /lfs/{oid}                                         the file's bytes (like S3: no Hub token sent here)
    POST /lfs-verify                                        LFS verify, with the token
    POST /api/datasets/{ns}/{name}/commit/{rev}             NDJSON: header, file (base64), lfsFile, deletedFile

Like the Hub, Parquet files (and anything binary or over 10 MB) go through LFS; text files go inline. Every
request except the LFS PUT must carry `Authorization: Bearer <token>`; a wrong token gets a 401.
`FakeHub.repos[repo_id]` holds what arrived: `{"private": bool, "files": {path: bytes}}`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import yaml
from aiohttp import web


@dataclass
class FakeHub:
    token: str
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)
    calls: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Authorization
    base_url: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    # ------------------------------------------------------------------ server

    def __enter__(self) -> FakeHub:
        started = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            loop.run_until_complete(self._start())
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-hub", daemon=True)
        self._thread.start()
        started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._log_and_auth], client_max_size=1 << 30)
        app.add_routes(
            [
                web.post("/api/repos/create", self._create),
                web.post("/api/validate-yaml", self._validate_yaml),
                web.get("/api/datasets/{ns}/{name}", self._info),
                web.get("/api/datasets/{ns}/{name}/tree/{rev}", self._tree),
                web.post("/api/datasets/{ns}/{name}/preupload/{rev}", self._preupload),
                web.post("/datasets/{ns}/{name}.git/info/lfs/objects/batch", self._lfs_batch),
                web.put("/lfs/{oid}", self._lfs_put),
                web.post("/lfs-verify", self._lfs_verify),
                web.post("/api/datasets/{ns}/{name}/commit/{rev}", self._commit),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"

    @web.middleware
    async def _log_and_auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        self.calls.append((request.method, request.path, auth))
        if request.match_info.http_exception is not None:  # not an endpoint of this fake (404/405)
            return await handler(request)
        if not request.path.startswith("/lfs/") and auth != f"Bearer {self.token}":
            return web.json_response({"error": "Invalid credentials in Authorization header"}, status=401)
        return await handler(request)

    # ------------------------------------------------------------------ endpoints

    @staticmethod
    def _repo_id(request: web.Request) -> str:
        return f"{request.match_info['ns']}/{request.match_info['name']}"

    def _repo(self, request: web.Request) -> dict[str, Any]:
        repo = self.repos.get(self._repo_id(request))
        if repo is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error": "Repository not found"}),
                content_type="application/json",
                headers={"X-Error-Code": "RepoNotFound"},
            )
        return repo

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("type") != "dataset":
            return web.json_response({"error": "this fake only holds datasets"}, status=400)
        repo_id = f"{body['organization']}/{body['name']}"
        if repo_id in self.repos:
            return web.json_response({"error": "You already created this dataset repo"}, status=409)
        self.repos[repo_id] = {"private": body.get("visibility") == "private", "files": {}}
        return web.json_response({"url": f"{self.base_url}/datasets/{repo_id}", "name": repo_id})

    async def _validate_yaml(self, request: web.Request) -> web.Response:
        content = (await request.json())["content"]
        head, sep, _ = content.removeprefix("---\n").partition("\n---\n")
        try:
            meta = yaml.safe_load(head) if content.startswith("---\n") and sep else None
        except yaml.YAMLError as exc:
            return web.json_response({"errors": [{"message": str(exc)}]}, status=400)
        if not isinstance(meta, dict):
            return web.json_response({"errors": [{"message": "no YAML metadata block"}]}, status=400)
        return web.json_response({"errors": [], "warnings": []})

    async def _info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        return web.json_response({"id": self._repo_id(request), "private": repo["private"], "sha": "0" * 40})

    async def _tree(self, request: web.Request) -> web.Response:
        files = self._repo(request)["files"]
        return web.json_response(
            [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()} for p, b in files.items()]
        )

    async def _preupload(self, request: web.Request) -> web.Response:
        self._repo(request)
        out = []
        for f in (await request.json())["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(".parquet") or b"\x00" in sample or f["size"] > 10 * 1024 * 1024
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        return web.json_response({"files": out, "commitOid": "0" * 40})

    async def _lfs_batch(self, request: web.Request) -> web.Response:
        self._repo(request)
        body = await request.json()
        objects = [
            {
                "oid": o["oid"],
                "size": o["size"],
                "authenticated": True,
                "actions": {
                    "upload": {"href": f"{self.base_url}/lfs/{o['oid']}"},
                    "verify": {"href": f"{self.base_url}/lfs-verify"},
                },
            }
            for o in body["objects"]
        ]
        return web.json_response({"transfer": "basic", "objects": objects})

    async def _lfs_put(self, request: web.Request) -> web.Response:
        data = await request.read()
        if hashlib.sha256(data).hexdigest() != request.match_info["oid"]:
            return web.json_response({"error": "content does not match its oid"}, status=400)
        self.lfs[request.match_info["oid"]] = data
        return web.Response(status=200)

    async def _lfs_verify(self, request: web.Request) -> web.Response:
        body = await request.json()
        data = self.lfs.get(body["oid"])
        if data is None or len(data) != body["size"]:
            return web.json_response({"error": "object not uploaded"}, status=404)
        return web.json_response({})

    async def _commit(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        if request.content_type != "application/x-ndjson":
            return web.json_response({"error": f"expected NDJSON, got {request.content_type}"}, status=400)
        files = dict(repo["files"])
        for line in (await request.read()).splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return web.json_response({"error": f"LFS object {value['oid']} was never uploaded"}, status=400)
                files[value["path"]] = self.lfs[value["oid"]]
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
        repo["files"] = files
        oid = hashlib.sha1(json.dumps(sorted(files)).encode()).hexdigest()
        return web.json_response(
            {"commitUrl": f"{self.base_url}/datasets/{self._repo_id(request)}/commit/{oid}", "commitOid": oid}
        )
