"""A local stand-in for the Hugging Face Hub: the endpoints `create_repo` and `create_commit` use.

It runs on 127.0.0.1 in a thread and keeps everything it receives (requests, LFS objects, commits,
files per branch), so tests can check byte for byte what arrived. Clients must run with
HF_HUB_DISABLE_XET=1: the Xet protocol cannot be faked here, plain LFS can.

Failure injection: `fail(method, path_regex, status, times)` answers the next `times` matching requests
with `status`; `hang_on_put(n)` blocks the n-th LFS upload until `release()` (to interrupt a client
halfway through an upload).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Commit:
    oid: str
    branch: str
    summary: str
    regular: dict[str, bytes]  # path -> content sent inline
    lfs: dict[str, str]  # path -> sha256 oid
    pr: int | None = None


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    prs: int = 0


class FakeHub:
    def __init__(self, token: str, lfs_threshold: int = 2048, namespaces: tuple[str, ...] = ("me", "my-org")):
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.namespaces = set(namespaces)
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.commits: list[Commit] = []
        self.requests: list[Request] = []
        self.put_oids: list[str] = []
        self.yaml_checked: list[str] = []
        self._failures: list[list] = []
        self._hang_at: int | None = None
        self.hanging = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # Control --------------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def fail(self, method: str, path_regex: str, status: int, times: int = 1) -> None:
        self._failures.append([method, re.compile(path_regex), status, times])

    def hang_on_put(self, n: int) -> None:
        self._hang_at = n

    def release(self) -> None:
        self._release.set()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        """The repository's files at the head of `branch`, LFS pointers resolved to their content."""
        return dict(self.repos[repo_id].branches[branch])

    # Handler --------------------------------------------------------------------------------------
    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _read(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _send(self, status: int, payload: object = None,
                      headers: dict[str, str] | None = None) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else 0))
                self.end_headers()
                if self.command != "HEAD" and data:
                    self.wfile.write(data)

            def _error(self, status: int, message: str, code: str | None = None) -> None:
                headers = {"X-Error-Message": message}
                if code:
                    headers["X-Error-Code"] = code
                self._send(status, {"error": message}, headers)

            def _dispatch(self) -> None:
                body = self._read()
                url = urlsplit(self.path)
                path, query = unquote(url.path), parse_qs(url.query)
                with hub._lock:
                    hub.requests.append(Request(self.command, self.path, dict(self.headers.items()), body))
                    for rule in hub._failures:
                        if rule[3] > 0 and rule[0] == self.command and rule[1].search(path):
                            rule[3] -= 1
                            return self._error(rule[2], f"injected {rule[2]}")
                try:
                    hub._route(self, path, query, body)
                except BrokenPipeError:
                    pass

            do_GET = do_POST = do_PUT = do_HEAD = _dispatch  # noqa: N815 - http.server's naming

        return Handler

    def _authorized(self, h) -> bool:
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            h._error(401, "Invalid credentials in Authorization header")
            return False
        return True

    def _repo(self, h, repo_id: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            h._error(404, "Repository not found", "RepoNotFound")
        return repo

    def _route(self, h, path: str, query: dict, body: bytes) -> None:
        m = None
        if h.command == "PUT" and (m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)):
            return self._lfs_put(h, m.group(1), body)  # like S3: a signed URL, no Hub token
        if not self._authorized(h):
            return None
        if h.command == "POST" and path == "/api/repos/create":
            return self._create_repo(h, json.loads(body))
        if h.command == "POST" and path == "/api/validate-yaml":
            self.yaml_checked.append(json.loads(body)["content"])
            return h._send(200, {"errors": [], "warnings": []})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path):
            return self._preupload(h, m.group(1), m.group(2), json.loads(body))
        if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
            return self._lfs_batch(h, m.group(1), json.loads(body))
        if m := re.fullmatch(r"/lfs-verify/([^/]+/[^/]+)", path):
            req = json.loads(body)
            ok = self.lfs.get(req["oid"]) is not None and len(self.lfs[req["oid"]]) == req["size"]
            return h._send(200, {}) if ok else h._error(404, "object not found")
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
            return self._commit(h, m.group(1), m.group(2), body, "create_pr" in query)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path):
            return self._branch(h, m.group(1), m.group(2))
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if h.command in ("GET", "HEAD") and (m := info):
            return self._info(h, m.group(1), m.group(2) or "main")
        return h._error(404, f"no route for {h.command} {path}")

    def _create_repo(self, h, req: dict) -> None:
        repo_id = f"{req.get('organization')}/{req['name']}"
        if req.get("organization") not in self.namespaces:
            return h._error(404, f"namespace {req.get('organization')} not found")
        if repo_id in self.repos:
            return h._send(409, {"error": "You already created this model repo",
                                 "url": f"{self.url}/{repo_id}"})
        self.repos[repo_id] = Repo(private=req.get("visibility") == "private" or bool(req.get("private")))
        return h._send(200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _preupload(self, h, repo_id: str, rev: str, req: dict) -> None:
        repo = self._repo(h, repo_id)
        if repo is None:
            return
        current = repo.branches.get(rev, {})
        out = []
        for f in req["files"]:
            lfs = f["size"] >= self.lfs_threshold or f["path"].endswith(".safetensors")
            old = current.get(f["path"])
            oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_sha1(old))
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        h._send(200, {"files": out, "commitOid": repo.heads.get(rev)})

    def _lfs_batch(self, h, repo_id: str, req: dict) -> None:
        if self._repo(h, repo_id) is None:
            return
        objects = []
        for obj in req["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs:
                item["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}"},
                                   "verify": {"href": f"{self.url}/lfs-verify/{repo_id}"}}
            objects.append(item)
        h._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, h, oid: str, body: bytes) -> None:
        with self._lock:
            self.put_oids.append(oid)
            n = len(self.put_oids)
        if self._hang_at is not None and n == self._hang_at:
            self.hanging.set()
            self._release.wait(60)
            return None  # the client was killed meanwhile: answer nothing
        if hashlib.sha256(body).hexdigest() != oid:
            return h._error(400, "sha256 mismatch")
        self.lfs[oid] = body
        return h._send(200, {})

    def _commit(self, h, repo_id: str, rev: str, body: bytes, create_pr: bool) -> None:
        repo = self._repo(h, repo_id)
        if repo is None:
            return
        if rev not in repo.branches:
            return h._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]
        if header.get("key") != "header":
            return h._error(400, "first line must be the header")
        regular: dict[str, bytes] = {}
        lfs: dict[str, str] = {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                regular[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return h._error(422, f"LFS object {value['oid']} was never uploaded")
                lfs[value["path"]] = value["oid"]
            else:
                return h._error(400, f"unsupported operation {line['key']}")
        files = dict(repo.branches[rev])
        files.update(regular)
        files.update({p: self.lfs[o] for p, o in lfs.items()})
        oid = hashlib.sha1(f"{repo_id}{len(self.commits)}{sorted(files)}".encode()).hexdigest()
        pr = None
        if create_pr:
            repo.prs += 1
            pr = repo.prs
            branch = f"refs/pr/{pr}"
        else:
            branch = rev
        repo.branches[branch] = files
        repo.heads[branch] = oid
        self.commits.append(Commit(oid, branch, header["value"]["summary"], regular, lfs, pr))
        payload = {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                   "pullRequestUrl": f"{self.url}/{repo_id}/discussions/{pr}" if pr else None}
        h._send(200, payload)

    def _branch(self, h, repo_id: str, branch: str) -> None:
        repo = self._repo(h, repo_id)
        if repo is None:
            return
        if branch in repo.branches:
            return h._error(409, "Reference already exists")
        repo.branches[branch] = dict(repo.branches["main"])
        repo.heads[branch] = repo.heads["main"]
        h._send(200, {})

    def _info(self, h, repo_id: str, rev: str) -> None:
        repo = self._repo(h, repo_id)
        if repo is None:
            return
        if rev not in repo.branches:
            return h._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        h._send(200, {"id": repo_id, "modelId": repo_id, "sha": repo.heads[rev], "private": repo.private,
                      "siblings": [{"rfilename": p} for p in sorted(repo.branches[rev])]})
