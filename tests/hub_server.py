"""A small in-memory Hugging Face Hub for tests: the real ``huggingface_hub`` client talks HTTP to it.

It listens on 127.0.0.1 only (two ports: the Hub API and a "CDN" that serves large files), keeps
everything in memory, refuses request bodies over ``max_body`` bytes and shuts itself down after
``lifetime`` seconds even if a test forgets to stop it.

Implemented (what ``HfApi.create_repo / create_commit / create_branch / create_tag / model_info``
and ``hf_hub_download`` use):

* ``POST /api/repos/create``: 409 when the repo exists; the first commit holds ``.gitattributes``.
* ``POST /api/validate-yaml``: parses the model card's YAML front matter (400 when invalid).
* ``POST /api/models/{repo}/preupload/{rev}``: ``"lfs"`` for ``*.safetensors`` / ``*.png`` /
  ``*.bin`` (``lfs=True``, the default) else ``"regular"``, with the git oid of the file already at
  that revision so unchanged files are skipped. Never Xet: clients need ``HF_HUB_DISABLE_XET=1``.
* ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer: a PUT href on the CDN port, which
  checks the sha256) and ``.../objects/verify``.
* ``POST /api/models/{repo}/commit/{branch}``: the NDJSON commit (``header``, ``file``, ``lfsFile``,
  ``deletedFile``, ``deletedFolder``), ``parentCommit`` checked.
* ``POST /api/models/{repo}/branch/{name}`` and ``/tag/{rev}``.
* ``GET /api/models/{repo}[/revision/{rev}]``: id, sha, private, siblings.
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1) and
  ``Content-Length``; LFS-type files are answered as on the real Hub: a 302 to
  the CDN port with ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``. Errors carry the
  ``X-Error-Code`` the client maps (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).
* Tokens: when ``token`` is set, writes need ``Authorization: Bearer <token>`` (401 otherwise) and
  private repos look missing without it, as on the Hub.

Example:
    >>> with HubServer() as hub:
    ...     api = HfApi(endpoint=hub.endpoint)
    ...     api.create_repo("org/name")
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import yaml

_INITIAL_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_LFS_SUFFIXES = (".safetensors", ".bin", ".png")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub returns as the ETag of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision) or self.tags.get(revision)
        if oid is None and revision in self.commits:
            oid = revision
        return self.commits.get(oid) if oid else None


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, **body: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.body = status, code, message, body
        self.repo_commit: str | None = None


class HubState:
    """The repos and the LFS-like blob store behind the two servers."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> content, served by the CDN port
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self._counter = 0

    def new_commit(self, repo: Repo, files: dict[str, bytes], message: str, parent: str | None) -> Commit:
        self._counter += 1
        oid = hashlib.sha1(f"{repo.repo_id}:{self._counter}:{message}:{parent}".encode()).hexdigest()
        commit = Commit(oid, files, message, parent)
        repo.commits[oid] = commit
        for data in files.values():
            self.blobs[hashlib.sha256(data).hexdigest()] = data
        return commit

    def repo(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")
        return repo

    def commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def _authorized(self) -> bool:
        token = self.state.token
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.server.max_body:
            self.close_connection = True  # the body is left unread
            raise HubError(413, None, f"request body over {self.server.max_body} bytes")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        with self.state.lock:
            self.state.requests.append((self.command, path))
        try:
            body = self._body() if self.command in ("POST", "PUT") else b""
            with self.state.lock:
                self.route(path, body)
        except HubError as exc:
            headers = {"X-Error-Message": exc.message}
            if exc.code:
                headers["X-Error-Code"] = exc.code
            if exc.repo_commit:
                headers["X-Repo-Commit"] = exc.repo_commit
            self._json(exc.status, {"error": exc.message, **exc.body}, headers)
        except (KeyError, ValueError, TypeError) as exc:  # malformed request
            self._json(400, {"error": f"bad request: {exc!r}"}, {"X-Error-Message": f"bad request: {exc!r}"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def route(self, path: str, body: bytes) -> None:
        raise NotImplementedError


class _ApiHandler(_Handler):
    def route(self, path: str, body: bytes) -> None:
        parts = path.strip("/").split("/")
        method = self.command
        if method == "POST" and path == "/api/repos/create":
            return self.create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self.validate_yaml(json.loads(body))
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if method == "GET" and not rest:
                return self.model_info(repo_id, "main")
            if method == "GET" and rest[0] == "revision" and len(rest) == 2:
                return self.model_info(repo_id, unquote(rest[1]))
            if method == "POST" and len(rest) == 2:
                revision = unquote(rest[1])
                action = {"preupload": self.preupload, "commit": self.commit, "branch": self.create_branch}
                if rest[0] in action:
                    return action[rest[0]](repo_id, revision, body)
                if rest[0] == "tag":
                    return self.create_tag(repo_id, revision, body)
        if (
            method == "POST"
            and len(parts) == 6
            and parts[1].endswith(".git")
            and parts[2:4] == ["info", "lfs"]
        ):
            repo_id = f"{parts[0]}/{parts[1].removesuffix('.git')}"
            if parts[4:] == ["objects", "batch"]:
                return self.lfs_batch(repo_id, json.loads(body))
            if parts[4:] == ["objects", "verify"]:
                return self.lfs_verify(json.loads(body))
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve("/".join(parts[:2]), unquote(parts[3]), unquote("/".join(parts[4:])))
        raise HubError(404, None, f"no route for {method} {path}")

    def _require_write(self) -> None:
        if not self._authorized():
            raise HubError(401, None, "Invalid credentials in Authorization header")

    # -- endpoints -----------------------------------------------------------------------------
    def create_repo(self, payload: dict[str, Any]) -> None:
        self._require_write()
        if payload.get("type", "model") != "model":
            raise HubError(400, None, "this test Hub only hosts model repos")
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.state.repos:
            url = f"{self.server.endpoint}/{repo_id}"
            raise HubError(409, None, f"You already created this model repo: {repo_id}", url=url)
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        commit = self.state.new_commit(
            repo, {".gitattributes": _INITIAL_GITATTRIBUTES}, "initial commit", None
        )
        repo.branches["main"] = commit.oid
        self.state.repos[repo_id] = repo
        self._json(200, {"url": f"{self.server.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self, payload: dict[str, Any]) -> None:
        content: str = payload.get("content", "")
        errors = []
        if content.startswith("---"):
            header = content.split("---", 2)[1]
            try:
                if not isinstance(yaml.safe_load(header) or {}, dict):
                    errors.append({"message": "metadata is not a mapping"})
            except yaml.YAMLError as exc:
                errors.append({"message": f"invalid YAML: {exc}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def model_info(self, repo_id: str, revision: str) -> None:
        repo = self.state.repo(repo_id, self._authorized())
        commit = self.state.commit(repo, revision)
        siblings = [{"rfilename": name} for name in sorted(commit.files)]
        self._json(200, {"id": repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings})

    def preupload(self, repo_id: str, revision: str, body: bytes) -> None:
        repo = self.state.repo(repo_id, self._authorized())
        commit = self.state.commit(repo, revision)
        files = []
        for item in json.loads(body)["files"]:
            existing = commit.files.get(item["path"])
            mode = "lfs" if self.server.lfs and item["path"].endswith(_LFS_SUFFIXES) else "regular"
            oid = None  # the Hub's id of the current content: sha256 for LFS files, git sha1 otherwise
            if existing is not None:
                oid = hashlib.sha256(existing).hexdigest() if mode == "lfs" else git_blob_oid(existing)
            files.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": files, "commitOid": commit.oid})

    def commit(self, repo_id: str, branch: str, body: bytes) -> None:
        self._require_write()
        repo = self.state.repo(repo_id, True)
        if branch not in repo.branches:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch} is not a branch")
        parent = repo.commits[repo.branches[branch]]
        files = dict(parent.files)
        header: dict[str, Any] = {}
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.state.blobs.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    raise HubError(
                        400, None, f"LFS object {value['oid']} for {value['path']} was not uploaded"
                    )
                files[value["path"]] = data
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {k: v for k, v in files.items() if not k.startswith(prefix)}
            else:
                raise HubError(400, None, f"unknown commit operation {key!r}")
        if header.get("parentCommit") not in (None, parent.oid):
            raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
        commit = self.state.new_commit(repo, files, header.get("summary", ""), parent.oid)
        repo.branches[branch] = commit.oid
        url = f"{self.server.endpoint}/{repo_id}/commit/{commit.oid}"
        self._json(200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})

    def lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> None:
        """Git LFS batch API, upload only: new objects get a PUT href on the CDN port and a verify href."""
        self._require_write()
        self.state.repo(repo_id, True)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, None, "this test Hub supports LFS basic uploads only")
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.blobs:
                verify = f"{self.server.endpoint}/{repo_id}.git/info/lfs/objects/verify"
                entry["actions"] = {
                    "upload": {"href": f"{self.server.cdn_endpoint}/upload/{obj['oid']}"},
                    "verify": {"href": verify},
                }
            objects.append(entry)
        self._json(
            200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}
        )

    def lfs_verify(self, payload: dict[str, Any]) -> None:
        data = self.state.blobs.get(payload["oid"])
        if data is None or len(data) != payload["size"]:
            raise HubError(404, None, f"LFS object {payload['oid']} not found")
        self._json(200, {})

    def create_branch(self, repo_id: str, branch: str, body: bytes) -> None:
        self._require_write()
        repo = self.state.repo(repo_id, True)
        if branch in repo.branches:
            raise HubError(409, None, f"Reference already exists: refs/heads/{branch}")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        repo.branches[branch] = self.state.commit(repo, start).oid
        self._json(200, {})

    def create_tag(self, repo_id: str, revision: str, body: bytes) -> None:
        self._require_write()
        repo = self.state.repo(repo_id, True)
        tag = json.loads(body)["tag"]
        if tag in repo.tags:
            raise HubError(409, None, f"Tag already exists: {tag}")
        repo.tags[tag] = self.state.commit(repo, revision).oid
        self._json(200, {})

    def resolve(self, repo_id: str, revision: str, filename: str) -> None:
        repo = self.state.repo(repo_id, self._authorized())
        commit = self.state.commit(repo, revision)
        data = commit.files.get(filename)
        if data is None:
            exc = HubError(404, "EntryNotFound", f"{filename} does not exist at {revision}")
            exc.repo_commit = commit.oid
            raise exc
        headers = {"X-Repo-Commit": commit.oid, "Content-Type": "application/octet-stream"}
        if filename.endswith(_LFS_SUFFIXES):  # answered like an LFS file: redirect to the CDN
            sha256 = hashlib.sha256(data).hexdigest()
            headers |= {
                "Location": f"{self.server.cdn_endpoint}/blobs/{sha256}",
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{git_blob_oid(data)}"',
            }
            return self._send(302, b"", headers)
        headers["ETag"] = f'"{git_blob_oid(data)}"'
        self._send(200, data, headers)


class _CdnHandler(_Handler):
    def route(self, path: str, body: bytes) -> None:
        parts = path.strip("/").split("/")
        if self.command == "PUT" and len(parts) == 2 and parts[0] == "upload":
            if hashlib.sha256(body).hexdigest() != parts[1]:
                raise HubError(400, None, "uploaded content does not match its LFS oid")
            self.state.blobs[parts[1]] = body
            return self._send(200)
        data = self.state.blobs.get(parts[-1]) if len(parts) == 2 and parts[0] == "blobs" else None
        if self.command not in ("GET", "HEAD") or data is None:
            raise HubError(404, None, "no such blob")
        self._send(200, data, {"Content-Type": "application/octet-stream", "ETag": f'"{parts[-1]}"'})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState
    endpoint: str
    cdn_endpoint: str
    max_body: int
    lfs: bool


class HubServer:
    """Start/stop the test Hub (API + CDN) on 127.0.0.1; a context manager.

    Args:
        token: when set, writes and private reads need ``Authorization: Bearer <token>``.
        lfs: answer preupload with ``"lfs"`` for ``*.safetensors`` / ``*.png`` (as the Hub does for
            binary files) and serve the Git LFS batch API; ``False``: every file is ``"regular"``.
        lifetime: seconds after which both servers stop by themselves.
        max_body: largest request body accepted, in bytes.
    """

    def __init__(
        self, token: str | None = None, *, lfs: bool = True, lifetime: float = 300.0, max_body: int = 64 << 20
    ) -> None:
        self.state = HubState(token)
        self.lfs = lfs
        self._servers = [_Server(("127.0.0.1", 0), cls) for cls in (_ApiHandler, _CdnHandler)]
        self.endpoint, self.cdn_endpoint = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        for server in self._servers:
            server.state, server.max_body, server.lfs = self.state, max_body, lfs
            server.endpoint, server.cdn_endpoint = self.endpoint, self.cdn_endpoint
        self._threads = [
            threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True) for s in self._servers
        ]
        self._deadline = threading.Timer(lifetime, self.stop)
        self._deadline.daemon = True
        self._stopped = False

    def start(self) -> HubServer:
        for thread in self._threads:
            thread.start()
        self._deadline.start()
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._deadline.cancel()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until both servers have stopped; returns whether they have."""
        for thread in self._threads:
            thread.join(timeout)
        return not any(thread.is_alive() for thread in self._threads)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers for tests ---------------------------------------------------------------------
    def file(self, repo_id: str, filename: str, revision: str = "main") -> bytes:
        with self.state.lock:
            repo = self.state.repos[repo_id]
            return self.state.commit(repo, revision).files[filename]

    def tamper(self, repo_id: str, filename: str, data: bytes, revision: str = "main") -> str:
        """Replace a file's bytes behind the client's back (a new commit on ``revision``); returns its oid."""
        with self.state.lock:
            repo = self.state.repos[repo_id]
            parent = self.state.commit(repo, revision)
            commit = self.state.new_commit(repo, {**parent.files, filename: data}, "tamper", parent.oid)
            repo.branches[revision] = commit.oid
            return commit.oid

    def url(self, repo_id: str, filename: str, revision: str = "main") -> str:
        return f"{self.endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{filename}"
