"""An API-compatible stand-in for the Hugging Face Hub, for tests (standard library only).

This is **not the Hub**. It serves, on ``127.0.0.1`` and a free port, the subset of the Hub's HTTP API
that ``huggingface_hub``, ``datasets`` and ``transformers`` call to create a repo, commit files to it
(regular and LFS) and read them back, so that ``push_to_hub`` / ``from_hub`` / ``load_dataset`` run the
real clients end to end without a network. Each route below was checked by running those clients
against it; behaviour the clients never exercise (pull requests, tags, gated repos, Xet storage,
pagination, ...) is not implemented and answers 404 / 400.

Routes (``{type}`` is ``model``, ``dataset`` or ``space``; ``{prefix}`` is ``""``, ``datasets/`` or ``spaces/``)::

    GET  /api/whoami-v2                                   who the token belongs to (401 without a valid token)
    POST /api/repos/create                                create a repo (409 with the repo ``url`` if it exists)
    POST /api/repos/delete                                delete a repo
    POST /api/validate-yaml                               README.md metadata check (front matter must be closed)
    GET  /api/{type}s/{ns}/{name}[/revision/{rev}]        repo info: ``sha``, ``siblings``, ``private``, ...
    POST /api/{type}s/{ns}/{name}/preupload/{rev}         upload mode per file: ``lfs`` for binary files and
                                                          parquet / safetensors / arrow / png / ..., else ``regular``
    POST /{prefix}{ns}/{name}.git/info/lfs/objects/batch  LFS batch: upload + verify hrefs point at this server
    PUT  /_lfs/upload/{oid}?ticket=...                    LFS object upload (sha256 checked, content-addressed)
    POST /_lfs/verify                                     LFS verify
    POST /api/{type}s/{ns}/{name}/commit/{rev}            ndjson commit (header, file, lfsFile, deletedFile,
                                                          deletedFolder); ``parentCommit`` checked (412)
    GET  /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]     tree listing (``recursive``, ``expand``)
    POST /api/{type}s/{ns}/{name}/paths-info/{rev}        info on given paths (form or JSON body)
    GET  /api/{type}s/{ns}/{name}/commits/{rev}           commit history, newest first
    GET  /api/{type}s/{ns}/{name}/refs                    branches
    GET|HEAD /{prefix}{ns}/{name}/resolve/{rev}/{path}    file content; ``X-Repo-Commit``, ``ETag`` (git blob
                                                          sha1, or sha256 for LFS files), ``Content-Length``,
                                                          ``Accept-Ranges``; ``Range`` requests answer 206
    POST /_standin/faults                                 test hook, not a Hub route: arm a fault (see below)

Storage: repos live under a temporary directory with real commit history. File contents are
content-addressed blobs (``blobs/<sha256>``); every commit is a new 40-hex revision id holding a full
tree ``{path: blob}``, and a branch head moves only once a commit has been fully validated (every LFS
object present, every deleted path existing, ``parentCommit`` matching), so a push that fails midway
leaves the repo at its previous revision. A new repo starts with one commit holding ``.gitattributes``,
as on the Hub. Uploaded LFS objects that no commit references stay in the blob store, as they do in
the Hub's object storage, and are invisible in every revision.

Fault injection: ``server.inject_fault("commit", status=500)`` makes the next request of that route
(names: ``whoami``, ``create-repo``, ``delete-repo``, ``validate-yaml``, ``repo-info``, ``preupload``,
``lfs-batch``, ``lfs-upload``, ``lfs-verify``, ``commit``, ``tree``, ``paths-info``, ``commits``,
``refs``, ``resolve``) answer ``status``; ``after=n`` lets n matching requests through first,
``times=k`` fails k of them, ``repo_id=`` restricts it to one repo. A client in another process can arm
the same fault with ``POST /_standin/faults`` and a JSON body of those keyword arguments. Note that
``huggingface_hub`` retries 408/429/5xx answers to preupload, LFS batch and LFS upload requests with
backoff (about 23 s for five retries), but not to the commit request.

Authentication: write routes need ``Authorization: Bearer <token>``; reads of public repos do not;
an invalid token is refused everywhere. The server never logs headers, so the token appears nowhere.

Clients must see ``HF_ENDPOINT`` (this server), a token and ``HF_HUB_DISABLE_XET=1`` **before**
``huggingface_hub`` / ``datasets`` / ``transformers`` are imported (they read them at import time), and
``HF_HUB_OFFLINE=0`` where the test session runs offline; :func:`client_env` builds that environment
for a subprocess, and the ``hub`` fixture (:func:`hub_fixture`; import it into a test module) yields it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

__all__ = ["HubStandIn", "HubFixture", "client_env", "hub_fixture", "TEST_TOKEN"]

#: A distinctive token, so that tests can assert it never appears in any output.
TEST_TOKEN = "hf_standinTOKEN_" + "9f3c1e7a5b2d4086"
TEST_USER = "repblend-tester"

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# What the Hub's default .gitattributes sends to LFS, reduced to the extensions a test may commit.
_LFS_SUFFIXES = (".parquet", ".safetensors", ".arrow", ".bin", ".pt", ".pth", ".npy", ".npz", ".png", ".jpg",
                 ".jpeg", ".gif", ".zip", ".gz", ".tar", ".h5", ".onnx", ".msgpack", ".pkl", ".ckpt")
_GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in _LFS_SUFFIXES).encode()
_ROUTE_NAMES = ("whoami", "create-repo", "delete-repo", "validate-yaml", "repo-info", "preupload", "lfs-batch",
                "lfs-upload", "lfs-verify", "commit", "tree", "paths-info", "commits", "refs", "resolve")


def _git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


@dataclass(frozen=True)
class _Entry:
    """One file of a tree: its content blob (sha256), size, and whether it is stored through LFS."""

    sha256: str
    size: int
    lfs: bool
    git_oid: str  # git blob id of the content (regular) or of the LFS pointer (LFS)

    def as_tree_item(self, path: str) -> dict:
        item = {"type": "file", "oid": self.git_oid, "size": self.size, "path": path}
        if self.lfs:
            pointer_size = len(_lfs_pointer(self.sha256, self.size))
            item["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": pointer_size}
        return item


@dataclass
class _Commit:
    oid: str
    parent: str | None
    tree: dict[str, _Entry]
    title: str
    message: str
    date: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)


@dataclass
class _Fault:
    route: str
    status: int = 500
    times: int = 1
    after: int = 0
    repo_id: str | None = None
    message: str = "Internal Error - injected by the test Hub stand-in"


class _Answer(Exception):
    """Raised inside a route to answer an error: status, Hub error code and message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


class HubStandIn:
    """The stand-in server: :meth:`start`, :attr:`endpoint`, :meth:`stop`; state lives under ``root``."""

    def __init__(self, root: str | os.PathLike | None = None, token: str = TEST_TOKEN, user: str = TEST_USER):
        self._own_root = root is None
        self.root = Path(root if root is not None else tempfile.mkdtemp(prefix="hub-standin-"))
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.token, self.user = token, user
        self.repos: dict[tuple[str, str], _Repo] = {}
        #: Every request answered, as ``(method, path without query, route name, status)``.
        self.requests: list[tuple[str, str, str, int]] = []
        self._faults: list[_Fault] = []
        self._lfs_tickets: dict[str, str] = {}
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> HubStandIn:
        handler = type("_Handler", (_Handler,), {"standin": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the Hub stand-in is not running; call start() first")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # --- test-facing helpers -------------------------------------------------------------------------------------

    def inject_fault(self, route: str, status: int = 500, times: int = 1, after: int = 0, repo_id: str | None = None,
                     message: str | None = None) -> None:
        """Make requests of ``route`` fail with ``status``: ``times`` of them, after letting ``after`` through."""
        if route not in _ROUTE_NAMES:
            raise ValueError(f"unknown route {route!r}; one of {_ROUTE_NAMES}")
        fault = _Fault(route, int(status), int(times), int(after), repo_id)
        if message:
            fault.message = message
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def head(self, repo_id: str, repo_type: str = "dataset", branch: str = "main") -> str:
        """The revision id ``branch`` points to."""
        return self._repo(repo_type, repo_id).branches[branch]

    def history(self, repo_id: str, repo_type: str = "dataset", branch: str = "main") -> list[str]:
        """Revision ids from ``branch``'s head back to the first commit."""
        repo = self._repo(repo_type, repo_id)
        out, oid = [], repo.branches[branch]
        while oid is not None:
            out.append(oid)
            oid = repo.commits[oid].parent
        return out

    def files(self, repo_id: str, repo_type: str = "dataset", revision: str = "main") -> dict[str, bytes]:
        """``{path: content}`` of every file at ``revision`` (a branch or a revision id)."""
        repo = self._repo(repo_type, repo_id)
        commit = repo.commits[self._resolve_revision(repo, revision)]
        return {path: self._blob(e.sha256).read_bytes() for path, e in commit.tree.items()}

    # --- state -------------------------------------------------------------------------------------------------

    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _Answer(404, "Repository not found", "RepoNotFound")
        return repo

    def _blob(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def _store_blob(self, content: bytes) -> str:
        sha = hashlib.sha256(content).hexdigest()
        path = self._blob(sha)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(content)
            os.replace(tmp, path)
        return sha

    @staticmethod
    def _resolve_revision(repo: _Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise _Answer(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _new_commit(self, repo: _Repo, parent: str | None, tree: dict[str, _Entry], title: str,
                    message: str) -> _Commit:
        listing = json.dumps({p: e.sha256 for p, e in sorted(tree.items())})
        seed = f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{listing}\n{title}\n{message}\n{len(repo.commits)}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = _Commit(oid, parent, dict(tree), title, message, _now())
        repo.commits[oid] = commit
        return commit

    def _save_index(self) -> None:
        # A human-readable record of every repo and commit next to the blobs (for debugging a failed test).
        index = {f"{r.repo_type}:{r.repo_id}": {
            "private": r.private, "branches": r.branches,
            "commits": {c.oid: {"parent": c.parent, "title": c.title,
                                "tree": {p: e.sha256 for p, e in c.tree.items()}} for c in r.commits.values()}}
            for r in self.repos.values()}
        (self.root / "repos.json").write_text(json.dumps(index, indent=1))

    # --- request dispatch ----------------------------------------------------------------------------------------

    def _authorized(self, headers) -> bool | None:
        """True: valid token; None: no token; False: a token that is not ours."""
        value = headers.get("Authorization")
        if not value:
            return None
        return value == f"Bearer {self.token}"

    def _take_fault(self, route: str, repo_id: str | None) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.route != route or (fault.repo_id is not None and fault.repo_id != repo_id):
                    continue
                if fault.after > 0:
                    fault.after -= 1
                    return None
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def handle(self, method: str, raw_path: str, query: dict[str, list[str]], headers, body: bytes):
        """Answer one request: ``(status, headers, body, route)``."""
        route, args = _match(method, raw_path)
        try:
            if route == "standin-faults":
                self.inject_fault(**json.loads(body or b"{}"))
                return 200, {}, b"{}", route
            if route is None:
                raise _Answer(404, f"Sorry, the Hub stand-in has no route for {method} {raw_path}")
            auth = self._authorized(headers)
            if auth is False:
                raise _Answer(401, "Invalid credentials in Authorization header")
            fault = self._take_fault(route, args.get("repo_id"))
            if fault is not None:
                raise _Answer(fault.status, fault.message)
            handler = getattr(self, "_route_" + route.replace("-", "_"))
            with self._lock:
                status, out_headers, out = handler(args=args, query=query, headers=headers, body=body, auth=auth)
        except _Answer as answer:
            status, out_headers = answer.status, {"X-Error-Message": answer.message, **answer.headers}
            if answer.code:
                out_headers["X-Error-Code"] = answer.code
            out = _json({"error": answer.message, **answer.extra})
        return status, out_headers, out, route or "unknown"

    def _need_write(self, auth) -> None:
        if not auth:
            raise _Answer(401, "You must be authenticated to write to a repo (pass a token)")

    def _readable(self, repo_type: str, repo_id: str, auth) -> _Repo:
        repo = self._repo(repo_type, repo_id)
        if repo.private and not auth:
            raise _Answer(401, "Repository not found", "RepoNotFound")
        return repo

    # --- routes --------------------------------------------------------------------------------------------------

    def _route_whoami(self, *, auth, **_):
        if not auth:
            raise _Answer(401, "Invalid credentials in Authorization header")
        return 200, {}, _json({"type": "user", "id": "0" * 24, "name": self.user, "fullname": "Test User",
                               "email": None, "orgs": [], "isPro": False,
                               "auth": {"type": "access_token",
                                        "accessToken": {"displayName": "tests", "role": "write"}}})

    def _route_create_repo(self, *, body, auth, **_):
        self._need_write(auth)
        payload = json.loads(body)
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _Answer(400, f"Invalid repo type {repo_type!r}")
        name, organization = payload["name"], payload.get("organization") or self.user
        repo_id = f"{organization}/{name}"
        url = f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            raise _Answer(409, f"You already created this {repo_type} repo", extra={"url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = _Repo(repo_type, repo_id, private, _now())
        sha = self._store_blob(_GITATTRIBUTES)
        tree = {".gitattributes": _Entry(sha, len(_GITATTRIBUTES), False, _git_blob_oid(_GITATTRIBUTES))}
        repo.branches["main"] = self._new_commit(repo, None, tree, "initial commit", "").oid
        self.repos[(repo_type, repo_id)] = repo
        self._save_index()
        return 200, {}, _json({"url": url, "name": repo_id, "id": "0" * 24})

    def _route_delete_repo(self, *, body, auth, **_):
        self._need_write(auth)
        payload = json.loads(body)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        self._repo(repo_type, repo_id)
        del self.repos[(repo_type, repo_id)]
        self._save_index()
        return 200, {}, b""

    def _route_validate_yaml(self, *, body, **_):
        content = json.loads(body).get("content", "")
        errors = []
        if content.startswith("---"):
            lines = content.splitlines()
            if not any(line.strip() == "---" for line in lines[1:]):
                errors.append({"message": "the YAML front matter is not closed by a '---' line"})
        if errors:
            return 400, {}, _json({"errors": errors, "warnings": []})
        return 200, {}, _json({"errors": [], "warnings": []})

    def _route_repo_info(self, *, args, auth, **_):
        repo = self._readable(args["repo_type"], args["repo_id"], auth)
        commit = repo.commits[self._resolve_revision(repo, args.get("revision") or "main")]
        info = {"_id": "0" * 24, "id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.oid,
                "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
                "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(commit.tree)],
                "usedStorage": sum(e.size for e in commit.tree.values())}
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return 200, {}, _json(info)

    def _route_preupload(self, *, args, body, auth, **_):
        self._need_write(auth)
        repo = self._repo(args["repo_type"], args["repo_id"])
        tree = repo.commits[self._resolve_revision(repo, args["revision"])].tree
        files = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].lower().endswith(_LFS_SUFFIXES) or b"\0" in sample or f.get("size", 0) > 10 * 2**20
            existing = tree.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.git_oid
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        return 200, {}, _json({"files": files, "commitOid": repo.branches.get(args["revision"])})

    def _route_lfs_batch(self, *, args, body, auth, **_):
        self._need_write(auth)
        self._repo(args["repo_type"], args["repo_id"])
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise _Answer(400, "the Hub stand-in only implements LFS uploads")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            answer = {"oid": oid, "size": size, "authenticated": True}
            blob = self._blob(oid)
            if not (blob.exists() and blob.stat().st_size == size):
                ticket = self._lfs_tickets.setdefault(oid, secrets.token_hex(8))
                answer["actions"] = {
                    "upload": {"href": f"{self.endpoint}/_lfs/upload/{oid}?size={size}&ticket={ticket}",
                               "expires_in": 3600},
                    "verify": {"href": f"{self.endpoint}/_lfs/verify", "header": {}, "expires_in": 3600},
                }
            objects.append(answer)
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, _json({"transfer": "basic",
                                                                              "objects": objects})

    def _route_lfs_upload(self, *, args, query, body, **_):
        oid = args["oid"]
        if query.get("ticket", [None])[0] != self._lfs_tickets.get(oid):
            raise _Answer(403, "Request has expired or its signature does not match")
        if hashlib.sha256(body).hexdigest() != oid:
            raise _Answer(400, f"uploaded content does not hash to {oid}")
        self._store_blob(body)
        self._lfs_tickets.pop(oid, None)
        return 200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, b""

    def _route_lfs_verify(self, *, body, **_):
        payload = json.loads(body)
        blob = self._blob(payload["oid"])
        if not blob.exists() or blob.stat().st_size != int(payload["size"]):
            raise _Answer(404, f"LFS object {payload['oid']} was not uploaded")
        return 200, {}, b"{}"

    def _route_commit(self, *, args, query, body, auth, **_):
        self._need_write(auth)
        repo = self._repo(args["repo_type"], args["repo_id"])
        branch = args["revision"]
        if query.get("create_pr"):
            raise _Answer(400, "the Hub stand-in does not implement pull requests")
        if branch not in repo.branches:
            raise _Answer(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Answer(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        head = repo.branches[branch]
        parent = header.get("parentCommit")
        if parent is not None and not head.startswith(parent):
            raise _Answer(412, "A commit has happened since. Please refresh and try again.")
        # Build the whole new tree first; the branch head only moves once every operation is valid.
        tree = dict(repo.commits[head].tree)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                    else value["content"].encode()
                tree[path] = _Entry(self._store_blob(content), len(content), False, _git_blob_oid(content))
            elif key == "lfsFile":
                oid = value["oid"]
                blob = self._blob(oid)
                if not blob.exists():
                    raise _Answer(422, f"LFS object {oid} for {path} was never uploaded")
                size = blob.stat().st_size
                tree[path] = _Entry(oid, size, True, _git_blob_oid(_lfs_pointer(oid, size)))
            elif key == "deletedFile":
                if path not in tree:
                    raise _Answer(404, "A file with this name doesn't exist", "EntryNotFound")
                del tree[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in tree if p.startswith(prefix)]
                if not doomed:
                    raise _Answer(404, "A folder with this name doesn't exist", "EntryNotFound")
                for p in doomed:
                    del tree[p]
            else:
                raise _Answer(400, f"unknown commit operation {key!r}")
        commit = self._new_commit(repo, head, tree, header.get("summary", ""), header.get("description", ""))
        repo.branches[branch] = commit.oid
        self._save_index()
        url = f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{commit.oid}"
        return 200, {}, _json({"success": True, "commitOid": commit.oid, "commitUrl": url, "hookOutput": "",
                               "pullRequestUrl": None})

    def _tree_items(self, commit: _Commit, paths: list[str] | None, base: str, recursive: bool,
                    expand: bool) -> list[dict]:
        """Files and folders under ``base`` (all, or direct children), or exactly ``paths``."""
        folders: set[str] = set()
        for p in commit.tree:
            parts = p.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        last = {"id": commit.oid, "title": commit.title, "date": commit.date}

        def file_item(p):
            item = commit.tree[p].as_tree_item(p)
            if expand:
                item["lastCommit"] = last
            return item

        def folder_item(p):
            tree_oid = hashlib.sha1(json.dumps(sorted((q, e.sha256) for q, e in commit.tree.items()
                                                      if q.startswith(p + "/"))).encode()).hexdigest()
            item = {"type": "directory", "oid": tree_oid, "size": 0, "path": p}
            if expand:
                item["lastCommit"] = last
            return item

        if paths is not None:
            return [file_item(p) if p in commit.tree else folder_item(p) for p in paths
                    if p in commit.tree or p in folders]
        if base and base not in folders:
            raise _Answer(404, f"{base} does not exist at {commit.oid}", "EntryNotFound")
        prefix = base + "/" if base else ""
        names = sorted({p for p in list(commit.tree) + list(folders) if p.startswith(prefix)
                        and (recursive or "/" not in p[len(prefix):])})
        return [file_item(p) if p in commit.tree else folder_item(p) for p in names]

    def _route_tree(self, *, args, query, auth, **_):
        repo = self._readable(args["repo_type"], args["repo_id"], auth)
        commit = repo.commits[self._resolve_revision(repo, args["revision"])]
        flag = lambda name: query.get(name, ["false"])[0].lower() in ("1", "true")  # noqa: E731
        items = self._tree_items(commit, None, args.get("path", "").strip("/"), flag("recursive"), flag("expand"))
        return 200, {}, _json(items)

    def _route_paths_info(self, *, args, headers, body, auth, **_):
        repo = self._readable(args["repo_type"], args["repo_id"], auth)
        commit = repo.commits[self._resolve_revision(repo, args["revision"])]
        if headers.get("Content-Type", "").startswith("application/json"):
            payload = json.loads(body)
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), form.get("expand", ["False"])[0].lower() in ("1", "true")
        if isinstance(paths, str):
            paths = [paths]
        return 200, {}, _json(self._tree_items(commit, [p.strip("/") for p in paths], "", False, expand))

    def _route_commits(self, *, args, auth, **_):
        repo = self._readable(args["repo_type"], args["repo_id"], auth)
        oid = self._resolve_revision(repo, args["revision"])
        out = []
        while oid is not None:
            c = repo.commits[oid]
            out.append({"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                        "authors": [{"user": self.user}]})
            oid = c.parent
        return 200, {}, _json(out)

    def _route_refs(self, *, args, auth, **_):
        repo = self._readable(args["repo_type"], args["repo_id"], auth)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()]
        return 200, {}, _json({"branches": branches, "converts": [], "tags": []})

    def _route_resolve(self, *, args, headers, auth, **_):
        repo = self._readable(args["repo_type"], args["repo_id"], auth)
        oid = self._resolve_revision(repo, args["revision"])
        entry = repo.commits[oid].tree.get(args["path"])
        if entry is None:
            raise _Answer(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": oid})
        content = self._blob(entry.sha256).read_bytes()
        etag = entry.sha256 if entry.lfs else entry.git_oid
        out = {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}
        if entry.lfs:
            out.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry.size)})
        wanted = headers.get("Range")
        if wanted:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
            total = len(content)
            if match is None or (not match.group(1) and not match.group(2)):
                raise _Answer(416, f"unsupported Range {wanted!r}", headers={"Content-Range": f"bytes */{total}"})
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), total - 1) if match.group(2) else total - 1
            else:
                start, end = max(0, total - int(match.group(2))), total - 1
            if start >= total or start > end:
                raise _Answer(416, "Requested Range Not Satisfiable", headers={"Content-Range": f"bytes */{total}"})
            out["Content-Range"] = f"bytes {start}-{end}/{total}"
            return 206, out, content[start:end + 1]
        return 200, out, content


def _json(value) -> bytes:
    return json.dumps(value).encode()


def _match(method: str, raw_path: str) -> tuple[str | None, dict]:
    """Route name and arguments of a request path (segments are URL-decoded one by one)."""
    parts = [unquote(p) for p in raw_path.strip("/").split("/")] if raw_path.strip("/") else []
    if method == "POST" and parts == ["_standin", "faults"]:
        return "standin-faults", {}
    if parts[:1] == ["_lfs"]:
        if method == "PUT" and len(parts) == 3 and parts[1] == "upload":
            return "lfs-upload", {"oid": parts[2]}
        if method == "POST" and parts[1:] == ["verify"]:
            return "lfs-verify", {}
        return None, {}
    if parts[:1] == ["api"]:
        rest = parts[1:]
        if method == "GET" and rest == ["whoami-v2"]:
            return "whoami", {}
        if method == "POST" and rest == ["repos", "create"]:
            return "create-repo", {}
        if method == "POST" and rest == ["repos", "delete"]:
            return "delete-repo", {}
        if method == "POST" and rest == ["validate-yaml"]:
            return "validate-yaml", {}
        if len(rest) >= 3 and rest[0] in _REPO_TYPES:
            args = {"repo_type": _REPO_TYPES[rest[0]], "repo_id": f"{rest[1]}/{rest[2]}"}
            tail = rest[3:]
            if method == "GET" and not tail:
                return "repo-info", args
            if method == "GET" and len(tail) == 2 and tail[0] == "revision":
                return "repo-info", {**args, "revision": tail[1]}
            if len(tail) == 2 and tail[0] in ("preupload", "commit", "paths-info", "commits") and (
                    method == ("GET" if tail[0] == "commits" else "POST")):
                return tail[0], {**args, "revision": tail[1]}
            if method == "GET" and len(tail) >= 2 and tail[0] == "tree":
                return "tree", {**args, "revision": tail[1], "path": "/".join(tail[2:])}
            if method == "GET" and tail == ["refs"]:
                return "refs", args
        return None, {}
    # /{prefix}{ns}/{name}.git/info/lfs/objects/batch and /{prefix}{ns}/{name}/resolve/{rev}/{path}
    repo_type = "model"
    if parts[:1] in (["datasets"], ["spaces"]):
        repo_type, parts = _REPO_TYPES[parts[0]], parts[1:]
    if (method == "POST" and len(parts) == 6 and parts[1].endswith(".git")
            and parts[2:] == ["info", "lfs", "objects", "batch"]):
        return "lfs-batch", {"repo_type": repo_type, "repo_id": f"{parts[0]}/{parts[1][:-4]}"}
    if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
        return "resolve", {"repo_type": repo_type, "repo_id": f"{parts[0]}/{parts[1]}", "revision": parts[3],
                           "path": "/".join(parts[4:])}
    return None, {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    standin: HubStandIn  # set on the subclass made in HubStandIn.start

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # never log: requests carry the token in their headers

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self, method: str) -> None:
        split = urlsplit(self.path)
        body = self._read_body() if method in ("POST", "PUT") else b""
        status, headers, out, route = self.standin.handle(method, split.path, parse_qs(split.query), self.headers,
                                                          body)
        self.standin.requests.append((method, split.path, route, status))
        self.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(out)

    def do_GET(self):  # noqa: N802
        self._serve("GET")

    def do_HEAD(self):  # noqa: N802
        self._serve("HEAD")

    def do_POST(self):  # noqa: N802
        self._serve("POST")

    def do_PUT(self):  # noqa: N802
        self._serve("PUT")


# ----- client side ------------------------------------------------------------------------------------------------


def client_env(endpoint: str, token: str, cache_dir: str | os.PathLike) -> dict[str, str]:
    """Environment for a client subprocess: this stand-in as the Hub, online, no Xet, caches in ``cache_dir``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    for key in ("TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                "all_proxy"):
        env.pop(key, None)
    cache = Path(cache_dir)
    env.update({
        "HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HOME": str(cache / "hf_home"), "HF_HUB_CACHE": str(cache / "hub"),
        "HF_DATASETS_CACHE": str(cache / "datasets"), "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]),
    })
    return env


@dataclass
class HubFixture:
    """What the :func:`hub` fixture yields: the stand-in, its endpoint, the token, a subprocess environment."""

    endpoint: str
    token: str
    env: dict[str, str]
    server: HubStandIn

    def run(self, script: str, *args: str, timeout: float = 120, env: dict | None = None):
        """Run ``python -c script args...`` against the stand-in; returns the CompletedProcess (text)."""
        import subprocess

        return subprocess.run([sys.executable, "-c", script, *args], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(name="hub")
def hub_fixture(tmp_path_factory):
    """A running :class:`HubStandIn` with a fresh store; yields a :class:`HubFixture`."""
    server = HubStandIn(tmp_path_factory.mktemp("hub-standin")).start()
    try:
        yield HubFixture(server.endpoint, server.token,
                         client_env(server.endpoint, server.token, tmp_path_factory.mktemp("hub-client-cache")),
                         server)
    finally:
        server.stop()


if __name__ == "__main__":  # python tests/hub_server.py: serve until interrupted (for trying a client by hand)
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill PID cleans up like Ctrl-C
    with HubStandIn() as standin:
        print(f"Hub stand-in at {standin.endpoint} (token {standin.token!r}, user {standin.user!r}); Ctrl-C stops",
              flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
