"""A stand-in Hugging Face hub on loopback, for `aegis fetch` (huggingface_hub honours
HF_ENDPOINT). Tests only.

It answers the routes huggingface_hub's snapshot_download uses (read from huggingface_hub
2.4's _snapshot_download.py, file_download.py, hf_api.py and utils/_http.py):

- GET  /api/models/{repo}/revision/{rev}      repo_info: {"id", "sha", "siblings"}
- GET  /api/models/{repo}/tree/{rev}[/{path}]  list_repo_tree (recursive): [{"type": "file",
       "path", "size", "oid", "lfs": {"oid", "size", "pointerSize"}}] (one page, no Link)
- HEAD /{repo}/resolve/{rev}/{file}            X-Repo-Commit, ETag (X-Linked-Etag and
       X-Linked-Size for LFS files), Content-Length; no X-Xet-Hash, so plain HTTP is used
- GET  the same, with Range: bytes=N- answered 206 + Content-Range (a resumed transfer)

Errors as the hub sends them: an unknown repo 401 + X-Error-Code: RepoNotFound, an unknown
revision 404 RevisionNotFound, a gated repo's files 401 (no token) or 403 (a token without
access) + X-Error-Code: GatedRepo. Every request is recorded (method, path, Range, bytes
sent), so a test can tell what moved; `drop_after[file] = N` cuts the connection once after N
bytes of that file, `delay` slows every 64 KiB of a body (to kill a fetch mid-file).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str = ""
    gated_token: str | None = None  # set: the files need this token
    lfs_suffixes: tuple[str, ...] = (".safetensors", ".bin")

    def __post_init__(self):
        if not self.sha:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + b"\0" + self.files[name])
            self.sha = digest.hexdigest()

    def is_lfs(self, name: str) -> bool:
        return name.endswith(self.lfs_suffixes)

    def etag(self, name: str) -> str:
        data = self.files[name]
        if self.is_lfs(name):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    sent: int
    status: int


@dataclass
class Hub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    drop_after: dict[str, int] = field(default_factory=dict)
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def downloads(self, name: str | None = None) -> list[Request]:
        """GETs of file bodies (of `name`), the transfers that moved bytes."""
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path
                and (name is None or r.path.endswith("/" + name))]


def serve(hub: Hub) -> tuple[ThreadingHTTPServer, str]:
    """Start the hub on 127.0.0.1 (a free port) in a thread: (server, HF_ENDPOINT)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _record(self, status: int, sent: int) -> None:
            with hub.lock:
                hub.requests.append(Request(self.command, unquote(urlsplit(self.path).path),
                                            self.headers.get("Range"), sent, status))

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
                  head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if "Content-Length" not in (headers or {}):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            self._record(status, 0 if head else len(body))

        def _error(self, status: int, code: str, head: bool, commit: str | None = None):
            headers = {"X-Error-Code": code, "X-Error-Message": code,
                       "Content-Type": "application/json"}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, json.dumps({"error": code}).encode(), headers, head)

        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        def _route(self, head: bool):
            path = unquote(urlsplit(self.path).path)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+|[^/]+)/revision/([^/]+)", path)
            if m:
                return self._info(m.group(1), m.group(2), head)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+|[^/]+)/tree/([^/]+)(/.*)?", path)
            if m:
                return self._tree(m.group(1), m.group(2), head)
            m = re.fullmatch(r"/([^/]+/[^/]+|[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._file(m.group(1), m.group(2), m.group(3), head)
            self._error(404, "NotFound", head)

        def _repo(self, name: str, rev: str, head: bool) -> Repo | None:
            repo = hub.repos.get(name)
            if repo is None:
                self._error(401, "RepoNotFound", head)
                return None
            if rev not in ("main", repo.sha):
                self._error(404, "RevisionNotFound", head)
                return None
            return repo

        def _info(self, name: str, rev: str, head: bool):
            repo = self._repo(name, rev, head)
            if repo:
                body = {"id": name, "modelId": name, "sha": repo.sha, "private": False,
                        "gated": "manual" if repo.gated_token else False,
                        "siblings": [{"rfilename": f} for f in sorted(repo.files)]}
                self._send(200, json.dumps(body).encode(),
                           {"Content-Type": "application/json"}, head)

        def _tree(self, name: str, rev: str, head: bool):
            repo = self._repo(name, rev, head)
            if repo:
                entries = []
                for f in sorted(repo.files):
                    entry = {"type": "file", "path": f, "size": len(repo.files[f]),
                             "oid": hashlib.sha1(repo.files[f]).hexdigest()}
                    if repo.is_lfs(f):
                        entry["lfs"] = {"oid": repo.etag(f), "size": len(repo.files[f]),
                                        "pointerSize": 134}
                    entries.append(entry)
                self._send(200, json.dumps(entries).encode(),
                           {"Content-Type": "application/json"}, head)

        def _file(self, name: str, rev: str, filename: str, head: bool):
            repo = self._repo(name, rev, head)
            if not repo:
                return
            if filename not in repo.files:
                return self._error(404, "EntryNotFound", head, repo.sha)
            if repo.gated_token:
                auth = self.headers.get("Authorization", "")
                if not auth:
                    return self._error(401, "GatedRepo", head)
                if auth != f"Bearer {repo.gated_token}":
                    return self._error(403, "GatedRepo", head)
            data = repo.files[filename]
            etag = repo.etag(filename)
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            if repo.is_lfs(filename):
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
            start = 0
            wanted = self.headers.get("Range")
            m = re.fullmatch(r"bytes=(\d+)-", wanted or "")
            status = 200
            if m and not head:
                start = int(m.group(1))
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            headers["Content-Length"] = str(len(body))
            if head:
                return self._send(200, b"", {**headers, "Content-Length": str(len(data))}, True)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            cut = None
            with hub.lock:
                if filename in hub.drop_after:
                    cut = hub.drop_after.pop(filename)
            sent = 0
            try:
                for i in range(0, len(body), 65536):
                    piece = body[i:i + 65536]
                    if cut is not None and sent + len(piece) > cut:
                        self.wfile.write(piece[:max(0, cut - sent)])
                        sent = cut
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    self.wfile.write(piece)
                    sent += len(piece)
                    if hub.delay:
                        self.wfile.flush()
                        time.sleep(hub.delay)
            except OSError:
                return
            finally:
                self._record(status, sent)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
