"""A Hugging Face Hub-compatible HTTP server on 127.0.0.1 for the pull tests.

It speaks the parts of the hub protocol huggingface_hub uses to download: repository info
with file metadata (`/api/models/{repo}/revision/{rev}`), the tree listing
snapshot_download reads (`/api/models/{repo}/tree/{rev}`), and `resolve` URLs answering
HEAD with the commit, ETag and size headers and GET with byte ranges. Faults on demand:
drop the connection mid-file once, serve bytes that do not match the advertised sha256,
answer a file with an error status (a hub hiccup), require a token."""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from .conftest import serve_in_thread

LFS_SUFFIXES = (".gguf", ".safetensors")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    token: str | None = None  # required as a Bearer token when set

    def sibling(self, name: str) -> dict:
        data = self.files[name]
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        out = {"rfilename": name, "size": len(data), "blobId": blob}
        if name.endswith(LFS_SUFFIXES):
            out["lfs"] = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "pointerSize": 134,
            }
        return out


@dataclass
class Hub:
    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, Range
    drop_once: dict[str, int] = field(default_factory=dict)  # file -> bytes before the drop
    corrupt: set[str] = field(default_factory=set)  # files served with a flipped byte
    fail: dict[str, int] = field(default_factory=dict)  # file -> HTTP status it answers
    url: str = ""

    def add_dir(
        self, repo_id: str, directory: Path, prefix: str = "", token: str | None = None
    ) -> None:
        files = {}
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                files[prefix + path.relative_to(directory).as_posix()] = path.read_bytes()
        repo = self.repos.get(repo_id)
        if repo is None:
            commit = hashlib.sha1(repo_id.encode()).hexdigest()
            self.repos[repo_id] = Repo(files, commit, token)
        else:
            repo.files.update(files)

    def gets(self, name: str) -> list[tuple[str, str, str]]:
        return [e for e in self.log if e[0] == "GET" and e[1].endswith("/" + name)]


def _handler(hub: Hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, code: int, kind: str) -> None:
            body = json.dumps({"error": kind}).encode()
            self._send(
                code,
                body,
                {"X-Error-Code": kind, "X-Error-Message": kind, "Content-Type": "application/json"},
            )

        def _repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound")
                return None
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                self._error(401, "RepoNotFound")
                return None
            return repo

        def _revision_ok(self, repo: Repo, rev: str) -> bool:
            if rev in ("main", repo.commit):
                return True
            self._error(404, "RevisionNotFound")
            return False

        def do_HEAD(self) -> None:
            self._route()

        def do_GET(self) -> None:
            self._route()

        def _route(self) -> None:
            path = unquote(urlparse(self.path).path)
            hub.log.append((self.command, path, self.headers.get("Range", "")))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) > 5 and parts[4] == "tree":
                # The tree listing snapshot_download reads (recursive: every file).
                repo = self._repo("/".join(parts[2:4]))
                if repo is None or not self._revision_ok(repo, parts[5]):
                    return
                prefix = "/".join(parts[6:])
                entries = []
                for name in sorted(repo.files):
                    if prefix and not name.startswith(prefix + "/"):
                        continue
                    sib = repo.sibling(name)
                    entry = {
                        "type": "file",
                        "path": name,
                        "size": sib["size"],
                        "oid": sib["blobId"],
                    }
                    if "lfs" in sib:
                        entry["lfs"] = {
                            "oid": sib["lfs"]["sha256"],
                            "size": sib["lfs"]["size"],
                            "pointerSize": sib["lfs"]["pointerSize"],
                        }
                    entries.append(entry)
                self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})
                return
            if parts[:2] == ["api", "models"]:
                repo_id = "/".join(parts[2:4])
                rev = parts[5] if len(parts) > 5 and parts[4] == "revision" else "main"
                repo = self._repo(repo_id)
                if repo is None or not self._revision_ok(repo, rev):
                    return
                info = {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": repo.commit,
                    "private": False,
                    "siblings": [repo.sibling(n) for n in sorted(repo.files)],
                }
                self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
                return
            if len(parts) >= 5 and parts[2] == "resolve":
                repo = self._repo("/".join(parts[:2]))
                if repo is None or not self._revision_ok(repo, parts[3]):
                    return
                name = "/".join(parts[4:])
                if name not in repo.files:
                    self._error(404, "EntryNotFound")
                    return
                # The file's body fails (its HEAD answers): huggingface_hub retries a 5xx
                # only on the HEAD, so the body's retries are verm-local's own.
                if name in hub.fail and self.command == "GET":
                    self._send(hub.fail[name], b"upstream trouble", {"Retry-After": "0"})
                    return
                self._file(repo, name)
                return
            self._error(404, "NotFound")

        def _file(self, repo: Repo, name: str) -> None:
            data = repo.files[name]
            sib = repo.sibling(name)
            etag = sib["lfs"]["sha256"] if "lfs" in sib else sib["blobId"]
            if name in hub.corrupt:  # a byte past the header flipped: only the sha256 tells
                mid = len(data) // 2
                data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            start, end = 0, None
            rng = self.headers.get("Range", "")
            if rng.startswith("bytes=") and self.command == "GET":
                first, _, last = rng[6:].partition("-")
                start = int(first or 0)
                end = int(last) if last else None  # bytes=0-N: exactly that range
            if self.command == "HEAD":
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return
            body = data[start : None if end is None else end + 1]
            code = 206 if start or end is not None else 200
            if code == 206:
                headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
            # A download dropped halfway (a bounded range, a header's read, is not dropped).
            cut = hub.drop_once.pop(name, None) if end is None else None
            if cut is not None:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self._send(code, body, headers)

    return Handler


def start(hub: Hub) -> tuple[ThreadingHTTPServer, Hub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    serve_in_thread(server)
    return server, hub
