"""`FakeHubServer`: a TEST DOUBLE of the Hugging Face Hub, for tests that push and pull without a network.

It is not the Hub and not a general-purpose server: it keeps a few repositories in memory and speaks only the HTTP
endpoints that the unmodified `huggingface_hub` client (2.4, with `HF_HUB_DISABLE_XET=1`) and `transformers` call
when the tests push (`whoami`, `create_repo`, `create_branch`, `repo_info`, `list_repo_files`, `create_commit` with
its `preupload_lfs_files` and LFS upload) and load (`hf_hub_download`, `snapshot_download`, `HfFileSystem`):

    GET  /api/whoami-v2                                   who a token belongs to
    GET  /api/agent-harnesses                             the client's agent registry (answered empty)
    POST /api/repos/create                                create a (private) model repo with its `.gitattributes`
    POST /api/validate-yaml                               check a README's metadata, like the Hub does before a commit
    GET  /api/models/{repo}[/revision/{rev}]              model info (sha, siblings, card data)
    POST /api/models/{repo}/preupload/{rev}               regular or LFS upload mode per file, and the remote oids
    POST /{repo}.git/info/lfs/objects/batch               LFS batch API: signed upload URLs on the storage origin
    PUT  <storage>/upload/{sha256}?...                    the "S3" upload (checked against its sha256 and size)
    POST /{repo}.git/info/lfs/objects/verify              LFS verify
    POST /api/models/{repo}/commit/{branch}               ndjson commit: files, LFS files, deletions, parentCommit
    POST /api/models/{repo}/branch/{branch}               create a branch
    GET  /api/models/{repo}/tree/{rev}                    the repo's files (recursive) or its top level
    HEAD/GET /{repo}/resolve/{rev}/{path}                 download; LFS files redirect to the storage origin, with
                                                          X-Linked-Etag/-Size, as the Hub redirects to its CDN;
                                                          `Range` requests are answered with 206 (or 416)

Spaces (`repo_type="space"`, created with an `sdk`) take the same endpoints under `/api/spaces/{repo}/...`,
`/spaces/{repo}.git/info/lfs/...` and `/spaces/{repo}/resolve/...`; they are stored under the key `spaces/{repo}`
(`hub.repos["spaces/org/name"]`, `hub.commits("spaces/org/name")`). Their README must name a known `sdk`.

Tokens are checked like on the Hub: an unknown token is rejected on every request (401, "Invalid credentials in
Authorization header"); a private repo is invisible (401/404 `RepoNotFound`) without a token of a member; writing needs
a `write` token of the namespace's user or one of their organisations. The storage origin listens on a second port of
127.0.0.1, so the client treats it as a CDN: it follows the redirect without the `Authorization` header, and storage
URLs carry their own signature instead.

    with FakeHubServer(tokens={"hf_write": ("alice", "write")}, organisations={"alice": ["emo-org"]}) as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_write"}  # before importing
        ...

`FakeHubServer.unhandled` lists the requests no route took: a client calling an endpoint the double lacks.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# Files above this size go to LFS whatever their content, like on the Hub.
LFS_THRESHOLD = 10 * 1024 * 1024
# A subset of the `.gitattributes` the Hub writes into every new model repo.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.bin", "*.ckpt", "*.h5", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.pkl", "*.pt", "*.pth",
                    "*.safetensors", "*.tar.gz", "*.zip", "*tfevents*")
)
SPACE_SDKS = {"gradio", "docker", "static"}
PIPELINE_TAGS = {"image-classification", "image-text-to-text", "zero-shot-image-classification", "feature-extraction"}
INVALID_TOKEN = "Invalid credentials in Authorization header"


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob, which the Hub uses as ETag and oid of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class RepoEntry:
    """One file of a commit: regular files keep their bytes, LFS files point into the LFS store by sha256."""

    path: str
    size: int
    oid: str
    content: bytes | None = None
    sha256: str | None = None

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None

    def tree_item(self) -> dict:
        item = {"type": "file", "oid": self.oid, "size": self.size, "path": self.path}
        if self.is_lfs:
            item["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(lfs_pointer(self.sha256, self.size))}
        return item


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    date: str
    files: dict[str, RepoEntry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    repo_type: str = "model"
    sdk: str | None = None

    @property
    def key(self) -> str:
        """Where `FakeHubServer.repos` keeps it: `org/name` for a model, `spaces/org/name` for a Space."""
        return repo_key(self.repo_type, self.repo_id)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def history(self, revision: str) -> list[Commit]:
        """Commits reachable from a revision, newest first."""
        commits, oid = [], self.resolve(revision)
        while oid is not None:
            commits.append(self.commits[oid])
            oid = self.commits[oid].parent
        return commits

    def resolve(self, revision: str) -> str | None:
        """A branch name or a full commit id -> the commit id, or None."""
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubError(Exception):
    """An error answer: status, JSON body `{"error": message}` and the Hub's `X-Error-*` headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = body or {}


def repo_key(repo_type: str, repo_id: str) -> str:
    return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class FakeHubServer:
    """A Hub-protocol TEST DOUBLE on 127.0.0.1 (see the module docstring). Not for anything but tests.

    Args:
        tokens: token -> (user name, role), role `"write"` or `"read"`.
        organisations: user name -> organisations whose namespaces the user may write to.
    """

    def __init__(self, tokens: dict[str, tuple[str, str]] | None = None,
                 organisations: dict[str, list[str]] | None = None, host: str = "127.0.0.1", port: int = 0):
        self.tokens = dict(tokens or {})
        self.organisations = {user: list(orgs) for user, orgs in (organisations or {}).items()}
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.unhandled: list[str] = []  # requests no route took: a client calling an endpoint the double lacks
        self.lock = threading.RLock()
        self._secret = secrets.token_bytes(16)
        self._hub = ThreadingHTTPServer((host, port), _HubHandler)
        self._storage = ThreadingHTTPServer((host, 0), _StorageHandler)
        for server in (self._hub, self._storage):
            server.daemon_threads = True
            server.fake = self  # the handlers reach the state through their server
        self._threads: list[threading.Thread] = []

    # ---- lifecycle -------------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        host, port = self._hub.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def storage_endpoint(self) -> str:
        host, port = self._storage.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHubServer:
        for server in (self._hub, self._storage):
            thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in (self._hub, self._storage):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> FakeHubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- inspection helpers for tests ------------------------------------------------------------------------

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        with self.lock:
            return self.repos[repo_id].history(revision)

    def file_content(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        with self.lock:
            repo = self.repos[repo_id]
            entry = repo.commits[repo.resolve(revision)].files[path]
            return self.lfs_objects[entry.sha256] if entry.is_lfs else entry.content

    # ---- authentication and authorisation --------------------------------------------------------------------

    def user_for(self, authorization: str | None) -> tuple[str, str] | None:
        """(user, role) of the request's bearer token; None when anonymous; 401 when the token is unknown."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token not in self.tokens:
            raise HubError(401, INVALID_TOKEN)
        return self.tokens[token]

    def can_write_namespace(self, user: tuple[str, str] | None, namespace: str) -> bool:
        if user is None or user[1] != "write":
            return False
        return namespace == user[0] or namespace in self.organisations.get(user[0], [])

    def readable_repo(self, repo_id: str, user: tuple[str, str] | None) -> Repo:
        """The repo if this user may see it; the Hub answers 401 to anonymous and 404 to others otherwise."""
        repo = self.repos.get(repo_id)
        visible = repo is not None and (not repo.private or (user is not None and (
            repo.namespace == user[0] or repo.namespace in self.organisations.get(user[0], []))))
        if not visible:
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def writable_repo(self, repo_id: str, user: tuple[str, str] | None) -> Repo:
        repo = self.readable_repo(repo_id, user)
        if user is None:
            raise HubError(401, "You must be authenticated to write to this repository")
        if not self.can_write_namespace(user, repo.namespace):
            raise HubError(403, f"You don't have the rights to write to {repo_id} (token role: {user[1]})")
        return repo

    def commit_of(self, repo: Repo, revision: str) -> Commit:
        oid = repo.resolve(revision)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    # ---- signed storage URLs ---------------------------------------------------------------------------------

    def sign(self, action: str, sha256: str, size: int) -> str:
        return hmac.new(self._secret, f"{action}:{sha256}:{size}".encode(), hashlib.sha256).hexdigest()

    def storage_url(self, action: str, sha256: str, size: int) -> str:
        return f"{self.storage_endpoint}/{action}/{sha256}?size={size}&sig={self.sign(action, sha256, size)}"

    # ---- repository operations -------------------------------------------------------------------------------

    def create_repo(self, repo_id: str, private: bool, repo_type: str = "model", sdk: str | None = None) -> Repo:
        repo = Repo(repo_id=repo_id, private=private, created_at=_now(), repo_type=repo_type, sdk=sdk)
        attributes = DEFAULT_GITATTRIBUTES.encode()
        entry = RepoEntry(".gitattributes", len(attributes), git_blob_oid(attributes), content=attributes)
        self.add_commit(repo, "main", None, {".gitattributes": entry}, "initial commit")
        self.repos[repo.key] = repo
        return repo

    def add_commit(self, repo: Repo, branch: str, parent: str | None, files: dict[str, RepoEntry], title: str) -> Commit:
        listing = json.dumps([parent, sorted((p, e.oid) for p, e in files.items()), title, time.time_ns()])
        commit = Commit(hashlib.sha1(listing.encode()).hexdigest(), parent, title, _now(), files)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def lfs_patterns(self, commit: Commit) -> list[str]:
        entry = commit.files.get(".gitattributes")
        text = (entry.content or b"").decode() if entry is not None else ""
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]

    def upload_mode(self, commit: Commit, path: str, size: int, sample: bytes) -> str:
        """LFS for large or binary files and for `.gitattributes` LFS patterns, as the Hub decides."""
        name = path.rsplit("/", 1)[-1]
        matches = any(fnmatch.fnmatch(path if "/" in p else name, p) for p in self.lfs_patterns(commit))
        return "lfs" if size >= LFS_THRESHOLD or b"\0" in sample or matches else "regular"


class _BaseHandler(BaseHTTPRequestHandler):
    """Shared plumbing: bodies (also chunked), JSON answers, error answers and the request log."""

    protocol_version = "HTTP/1.1"
    server_version = "FakeHubServer/1.0 (test double)"

    @property
    def fake(self) -> FakeHubServer:
        return self.server.fake

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        pass  # requests are recorded in `FakeHubServer.requests` instead of flooding the test output

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json",
             length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.fake.requests.append((self.command, self.path, status))

    def send_json(self, data, status: int = 200, headers: dict | None = None) -> None:
        self.send(status, json.dumps(data).encode(), headers)

    def send_error_answer(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message, **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self.send_json({"error": error.message, **error.body}, error.status, headers)

    def dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        # Split before unquoting: revisions such as `refs%2Fpr%2F1` are one quoted path segment.
        self.segments = [unquote(part) for part in url.path.strip("/").split("/")]
        try:
            with self.fake.lock:
                self.route()
        except HubError as error:
            self.send_error_answer(error)

    do_GET = do_HEAD = do_POST = do_PUT = dispatch

    def route(self) -> None:
        raise NotImplementedError


class _HubHandler(_BaseHandler):
    """The Hub origin: API, LFS batch and resolve endpoints."""

    def route(self) -> None:
        self.user = self.fake.user_for(self.headers.get("Authorization"))
        s, method = self.segments, self.command
        if s[:2] == ["api", "whoami-v2"] and method == "GET":
            return self.whoami()
        if s[:3] == ["api", "repos", "create"] and method == "POST":
            return self.create_repo()
        if s[:2] == ["api", "validate-yaml"] and method == "POST":
            return self.validate_yaml()
        if s[:2] in (["api", "models"], ["api", "spaces"]) and len(s) >= 4:
            # Handlers get the repo's key: `org/name` for models, `spaces/org/name` for Spaces (also its URL path).
            prefix = "" if s[1] == "models" else "spaces/"
            repo_id, action, rest = f"{prefix}{s[2]}/{s[3]}", (s[4] if len(s) > 4 else None), s[5:]
            handler = {
                (None, "GET"): self.model_info, ("revision", "GET"): self.model_info,
                ("preupload", "POST"): self.preupload, ("commit", "POST"): self.commit,
                ("branch", "POST"): self.create_branch, ("tree", "GET"): self.tree,
            }.get((action, method))
            if handler is not None:
                return handler(repo_id, rest)
        prefix = ""
        if s[:1] == ["spaces"] and len(s) > 1:
            prefix, s = "spaces/", s[1:]
        if len(s) >= 5 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"] and method == "POST":
            repo_id = f"{prefix}{s[0]}/{s[1][:-4]}"
            if len(s) == 6 and s[5] == "batch":
                return self.lfs_batch(repo_id)
            if len(s) == 6 and s[5] == "verify":
                return self.lfs_verify(repo_id)
        if len(s) >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
            return self.resolve(f"{prefix}{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        if s[:2] == ["api", "agent-harnesses"] and method == "GET":
            # The client's best-effort agent detection; the test double knows no agent harnesses.
            return self.send_json({"standardEnvVars": [], "harnesses": {}})
        self.fake.unhandled.append(f"{method} {urlsplit(self.path).path}")
        raise HubError(404, f"FakeHubServer does not implement {method} {urlsplit(self.path).path}")

    def body_json(self):
        try:
            return json.loads(self.read_body() or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from None

    # ---- account and repos -----------------------------------------------------------------------------------

    def whoami(self) -> None:
        if self.user is None:
            raise HubError(401, INVALID_TOKEN)
        name, role = self.user
        self.send_json({"type": "user", "name": name, "fullname": name,
                        "orgs": [{"type": "org", "name": org} for org in self.fake.organisations.get(name, [])],
                        "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}}})

    def create_repo(self) -> None:
        payload = self.body_json()
        if self.user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        namespace = payload.get("organization") or self.user[0]
        repo_type = payload.get("type") or "model"
        if repo_type not in ("model", "space"):
            raise HubError(400, "FakeHubServer only hosts model repositories and Spaces")
        if repo_type == "space" and payload.get("sdk") not in SPACE_SDKS:
            raise HubError(400, f"A Space needs an sdk, one of {sorted(SPACE_SDKS)}")
        if not self.fake.can_write_namespace(self.user, namespace):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace!r}")
        repo_id = f"{namespace}/{payload['name']}"
        key = repo_key(repo_type, repo_id)
        if key in self.fake.repos:
            # The Hub's conflict answer carries the repo's URL, which `create_repo(exist_ok=True)` returns.
            raise HubError(409, f"You already created this {repo_type} repo", body={"url": self.repo_url(key)})
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        self.fake.create_repo(repo_id, private, repo_type, payload.get("sdk"))
        self.send_json({"url": self.repo_url(key), "name": repo_id, "id": repo_id})

    def repo_url(self, repo_id: str) -> str:
        return f"{self.fake.endpoint}/{repo_id}"

    def validate_yaml(self) -> None:
        payload = self.body_json()
        errors, warnings = metadata_errors(payload.get("content", ""), payload.get("repoType") or "model")
        if errors:
            return self.send_json({"errors": [{"message": m} for m in errors], "warnings": []}, 400)
        self.send_json({"errors": [], "warnings": [{"message": m} for m in warnings]})

    def model_info(self, repo_id: str, rest: list[str]) -> None:
        repo = self.fake.readable_repo(repo_id, self.user)
        commit = self.fake.commit_of(repo, rest[0] if rest else "main")
        card = card_metadata(commit)
        info = {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "author": repo.namespace,
                "sha": commit.oid, "private": repo.private, "disabled": False, "likes": 0, "createdAt": repo.created_at,
                "lastModified": commit.date, "cardData": card or None, "tags": card.get("tags", []),
                "siblings": [{"rfilename": path} for path in sorted(commit.files)]}
        if repo.repo_type == "space":
            return self.send_json({**info, "sdk": card.get("sdk", repo.sdk), "models": card.get("models", [])})
        config = json.loads(commit.files["config.json"].content) if "config.json" in commit.files else None
        self.send_json({
            **info, "modelId": repo.repo_id, "gated": False, "downloads": 0, "pipeline_tag": card.get("pipeline_tag"),
            "library_name": card.get("library_name"),
            "config": {key: config.get(key) for key in ("architectures", "model_type", "auto_map")} if config else None,
        })

    def create_branch(self, repo_id: str, rest: list[str]) -> None:
        repo = self.fake.writable_repo(repo_id, self.user)
        payload, branch = self.body_json(), "/".join(rest)
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        start = self.fake.commit_of(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        self.send_json({})

    # ---- uploads ---------------------------------------------------------------------------------------------

    def preupload(self, repo_id: str, rest: list[str]) -> None:
        repo = self.fake.writable_repo(repo_id, self.user)
        commit = self.fake.commit_of(repo, "/".join(rest))
        files = []
        for item in self.body_json().get("files", []):
            mode = self.fake.upload_mode(commit, item["path"], item["size"], base64.b64decode(item["sample"]))
            existing = commit.files.get(item["path"])
            oid = None if existing is None else (existing.sha256 if existing.is_lfs else existing.oid)
            files.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self.send_json({"files": files, "commitOid": commit.oid})

    def lfs_batch(self, repo_id: str) -> None:
        self.fake.writable_repo(repo_id, self.user)
        payload = self.body_json()
        if payload.get("operation") != "upload":
            raise HubError(400, "FakeHubServer's LFS batch API only takes uploads")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            answer = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.fake.lfs_objects:  # already stored objects need no upload, as on the Hub
                answer["actions"] = {
                    "upload": {"href": self.fake.storage_url("upload", oid, size), "header": {}},
                    "verify": {"href": f"{self.fake.endpoint}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(answer)
        self.send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_verify(self, repo_id: str) -> None:
        self.fake.writable_repo(repo_id, self.user)
        payload = self.body_json()
        stored = self.fake.lfs_objects.get(payload.get("oid"))
        if stored is None or len(stored) != payload.get("size"):
            raise HubError(404, f"LFS object {payload.get('oid')} was not uploaded")
        self.send_json({"success": True})

    def commit(self, repo_id: str, rest: list[str]) -> None:
        repo = self.fake.writable_repo(repo_id, self.user)
        branch = "/".join(rest)
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch} is not a branch", "RevisionNotFound")
        lines = [json.loads(line) for line in self.read_body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "A commit starts with a header line")
        header = lines[0]["value"]
        head = repo.commits[repo.branches[branch]]
        if header.get("parentCommit") not in (None, head.oid):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines[1:]:
            self.apply_operation(files, line["key"], line["value"])
        commit = self.fake.add_commit(repo, branch, head.oid, files, header.get("summary", ""))
        self.send_json({"success": True, "commitOid": commit.oid, "commitUrl": f"{self.repo_url(repo_id)}/commit/"
                        f"{commit.oid}", "hookOutput": "", "pullRequestUrl": None})

    def apply_operation(self, files: dict[str, RepoEntry], key: str, value: dict) -> None:
        path = value["path"]
        if key == "file":
            content = base64.b64decode(value["content"])
            files[path] = RepoEntry(path, len(content), git_blob_oid(content), content=content)
        elif key == "lfsFile":
            stored = self.fake.lfs_objects.get(value["oid"])
            if stored is None:
                raise HubError(422, f"LFS object {value['oid']} for {path} was never uploaded")
            pointer = lfs_pointer(value["oid"], len(stored))
            files[path] = RepoEntry(path, len(stored), git_blob_oid(pointer), sha256=value["oid"])
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")

    # ---- listings --------------------------------------------------------------------------------------------

    def tree(self, repo_id: str, rest: list[str]) -> None:
        """`list_repo_files` asks for every file (`recursive=true`), `HfFileSystem` for the top level."""
        repo = self.fake.readable_repo(repo_id, self.user)
        if len(rest) != 1:
            raise HubError(400, "FakeHubServer lists a whole revision only, not a folder of it")
        commit = self.fake.commit_of(repo, rest[0])
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        items, folders = [], set()
        for path, entry in sorted(commit.files.items()):
            parts = path.split("/")
            folders.update("/".join(parts[:depth]) for depth in range(1, len(parts) if recursive else min(len(parts), 2)))
            if recursive or len(parts) == 1:
                items.append(entry.tree_item())
        items += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                  for f in sorted(folders)]
        self.send_json(items)

    # ---- downloads -------------------------------------------------------------------------------------------

    def resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self.fake.readable_repo(repo_id, self.user)
        commit = self.fake.commit_of(repo, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if entry.is_lfs:
            # The Hub answers LFS files with a redirect to its CDN, carrying the file's own etag and size.
            headers.update({"Location": self.fake.storage_url("blob", entry.sha256, entry.size),
                            "X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size),
                            "ETag": f'"{entry.oid}"'})
            return self.send(302, b"", headers, content_type="text/plain")
        send_ranged(self, entry.content, {**headers, "ETag": f'"{entry.oid}"'})


class _StorageHandler(_BaseHandler):
    """The storage origin ("S3/CDN"): signed uploads of LFS objects and signed, ranged downloads."""

    def route(self) -> None:
        s = self.segments
        if len(s) != 2 or s[0] not in ("upload", "blob"):
            raise HubError(404, "No such storage object")
        action, sha256 = s
        size = int(self.query.get("size", ["-1"])[0])
        if not hmac.compare_digest(self.query.get("sig", [""])[0], self.fake.sign(action, sha256, size)):
            raise HubError(403, "Invalid or missing signature")
        if action == "upload" and self.command == "PUT":
            content = self.read_body()
            if len(content) != size or hashlib.sha256(content).hexdigest() != sha256:
                raise HubError(400, "Uploaded content does not match its sha256 and size")
            self.fake.lfs_objects[sha256] = content
            return self.send(200, b"", {"ETag": f'"{hashlib.md5(content).hexdigest()}"'})
        if action == "blob" and self.command in ("GET", "HEAD"):
            return send_ranged(self, self.fake.lfs_objects[sha256], {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"},
                               content_type="application/octet-stream")
        raise HubError(405, f"{self.command} is not allowed here")


def send_ranged(handler: _BaseHandler, content: bytes, headers: dict, content_type="text/plain") -> None:
    """Answer a GET/HEAD, honouring a single `Range: bytes=a-b | a- | -n` like S3 and the Hub."""
    spec = handler.headers.get("Range")
    if not spec:
        return handler.send(200, content, headers, content_type=content_type)
    start_text, _, end_text = spec.removeprefix("bytes=").partition("-")
    total = len(content)
    if not start_text:
        start, end = max(total - int(end_text), 0), total - 1
    else:
        start, end = int(start_text), min(int(end_text), total - 1) if end_text else total - 1
    if start >= total or start > end:
        return handler.send(416, b"", {**headers, "Content-Range": f"bytes */{total}"}, content_type=content_type)
    part = content[start:end + 1]
    handler.send(206, part, {**headers, "Content-Range": f"bytes {start}-{end}/{total}"}, content_type=content_type)


# ---- model card metadata ---------------------------------------------------------------------------------------


def split_front_matter(content: str) -> tuple[str | None, str]:
    """The YAML block between the leading `---` lines of a README, and the rest."""
    if not content.startswith("---"):
        return None, content
    head, sep, body = content[3:].partition("\n---")
    return (head, body) if sep else (None, content)


def card_metadata(commit: Commit) -> dict:
    entry = commit.files.get("README.md")
    if entry is None:
        return {}
    head, _ = split_front_matter(entry.content.decode())
    data = yaml.safe_load(head) if head else None
    return data if isinstance(data, dict) else {}


def metadata_errors(content: str, repo_type: str = "model") -> tuple[list[str], list[str]]:
    """(errors, warnings) of a README's metadata, checking the fields the Hub checks for model repos and Spaces."""
    head, _ = split_front_matter(content)
    if head is None or not head.strip():
        return [], ["Empty metadata"]
    try:
        data = yaml.safe_load(head)
    except yaml.YAMLError as error:
        return [f"Invalid YAML: {error}"], []
    if not isinstance(data, dict):
        return ["Metadata must be a YAML mapping"], []
    errors = []
    if repo_type == "space":
        if data.get("sdk") not in SPACE_SDKS:
            errors.append(f'"sdk" must be one of {sorted(SPACE_SDKS)}')
        for key in ("app_file", "sdk_version", "title"):
            if key in data and not isinstance(data[key], str):
                errors.append(f'"{key}" must be a string')
        if "models" in data and not (isinstance(data["models"], list) and all(isinstance(v, str) for v in data["models"])):
            errors.append('"models" must be a list of model ids')
        return errors, []
    for key in ("license", "library_name", "pipeline_tag"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    if data.get("pipeline_tag") is not None and data["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" {data["pipeline_tag"]!r} is not a known task')
    for key in ("tags", "datasets", "language"):
        if key in data and not (isinstance(data[key], list) and all(isinstance(v, str) for v in data[key])):
            errors.append(f'"{key}" must be a list of strings')
    if "base_model" in data and not isinstance(data["base_model"], (str, list)):
        errors.append('"base_model" must be a model id or a list of model ids')
    errors += model_index_errors(data.get("model-index"))
    return errors, []


def model_index_errors(model_index) -> list[str]:
    if model_index is None:
        return []
    if not isinstance(model_index, list):
        return ['"model-index" must be a list']
    errors = []
    for model in model_index:
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            errors.append('"model-index[].name" must be a string')
            continue
        for result in model.get("results") or []:
            if not isinstance((result.get("task") or {}).get("type"), str):
                errors.append('"model-index[].results[].task.type" is required')
            dataset = result.get("dataset") or {}
            if not (isinstance(dataset.get("name"), str) and isinstance(dataset.get("type"), str)):
                errors.append('"model-index[].results[].dataset" needs a name and a type')
            for metric in result.get("metrics") or []:
                if not isinstance(metric.get("type"), str) or not isinstance(metric.get("value"), (int, float, str)):
                    errors.append('"model-index[].results[].metrics[]" needs a type and a value')
    return errors


__all__ = ["FakeHubServer", "HubError", "git_blob_oid", "metadata_errors"]
