"""A small in-memory stand-in for the Hugging Face Hub HTTP API, for tests.

It implements just enough of the API for the real ``huggingface_hub`` client (1.x and 2.x) to create a repo and a
branch, upload a folder (preupload + NDJSON commit, regular/base64 files only, never LFS or Xet) and download files
(``hf_hub_download`` HEAD + GET on ``/resolve``). Point a client at it with ``HF_ENDPOINT=server.url``.

``fail_mode`` makes it misbehave on purpose: ``'all'`` answers every request with ``fail_status``, ``'commit'``
only the commit endpoint (so repo creation works and the upload fails).
"""
import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

try:
    import yaml
except ImportError:  # pragma: no cover - yaml ships with timm and huggingface_hub
    yaml = None

USER = 'test-user'
GITATTRIBUTES = b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n'


def git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob, what the Hub reports as ``oid`` for regular files."""
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: Dict[str, bytes]
    title: str
    parent: Optional[str] = None


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: Dict[str, str] = field(default_factory=dict)  # branch name -> commit oid
    commits: Dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Optional[Commit]:
        """Commit for a branch name or a full commit oid."""
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class HubError(Exception):
    """An HTTP error answer, with the Hub's ``X-Error-Code`` header when the client dispatches on it."""

    def __init__(
            self,
            status: int,
            message: str,
            code: Optional[str] = None,
            commit: Optional[str] = None,
            extra: Optional[Dict[str, Any]] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.commit = commit
        self.extra = extra or {}


class HubState:
    """Repos, request log and failure switches, shared by all handler threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.repos: Dict[str, Repo] = {}
        self.requests: List[Tuple[str, str]] = []  # (method, path)
        self.auth_headers: List[str] = []
        self.user_agents: List[str] = []
        self.fail_mode: Optional[str] = None
        self.fail_status = 500
        self._counter = 0

    def new_commit(self, repo: Repo, files: Dict[str, bytes], title: str, parent: Optional[str]) -> Commit:
        self._counter += 1
        digest = hashlib.sha1(f'{repo.repo_id}:{self._counter}:{title}:{parent}'.encode())
        for path in sorted(files):
            digest.update(path.encode() + b'\0' + hashlib.sha1(files[path]).digest())
        commit = Commit(oid=digest.hexdigest(), files=files, title=title, parent=parent)
        repo.commits[commit.oid] = commit
        return commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_version = 'FakeHub/0.1'
    state: HubState  # set on the subclass made per server

    # ------------------------------------------------------------------ plumbing

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_GET(self) -> None:
        self._dispatch('GET')

    def do_HEAD(self) -> None:
        self._dispatch('HEAD')

    def do_POST(self) -> None:
        self._dispatch('POST')

    def do_PUT(self) -> None:
        self._dispatch('PUT')

    def do_DELETE(self) -> None:
        self._dispatch('DELETE')

    def _read_body(self) -> bytes:
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b';')[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b''.join(chunks)
        length = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(length) if length else b''

    def _json(self, body: bytes) -> Any:
        try:
            return json.loads(body or b'{}')
        except ValueError:
            raise HubError(400, 'Invalid JSON body')

    def _send(self, status: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None, head: bool = False):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault('Content-Type', 'application/json')
        headers.setdefault('Content-Length', str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _send_json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode())

    def _send_error(self, err: HubError, head: bool = False) -> None:
        headers = {'X-Error-Message': err.message}
        if err.code:
            headers['X-Error-Code'] = err.code
        if err.commit:
            headers['X-Repo-Commit'] = err.commit
        body = json.dumps({'error': err.message, **err.extra}).encode()
        self._send(err.status, body, headers, head=head)

    def _dispatch(self, method: str) -> None:
        state = self.state
        url = urlsplit(self.path)
        body = self._read_body() if method in ('POST', 'PUT', 'DELETE') else b''
        with state.lock:
            state.requests.append((method, url.path))
            if self.headers.get('Authorization'):
                state.auth_headers.append(self.headers['Authorization'])
            if self.headers.get('User-Agent'):
                state.user_agents.append(self.headers['User-Agent'])
            fail_mode, fail_status = state.fail_mode, state.fail_status
        is_commit = method == 'POST' and '/commit/' in url.path
        if fail_mode == 'all' or (fail_mode == 'commit' and is_commit):
            self._send_error(HubError(fail_status, f'Injected failure (fake hub fail_mode={fail_mode})'))
            return
        try:
            with state.lock:
                self._route(method, url.path, parse_qs(url.query), body)
        except HubError as err:
            self._send_error(err, head=method == 'HEAD')

    # ------------------------------------------------------------------ routing

    def _route(self, method: str, path: str, query: Dict[str, List[str]], body: bytes) -> None:
        parts = path.split('/')[1:]  # keep quoting per segment: revisions arrive quoted with safe=''
        if method == 'POST' and path == '/api/repos/create':
            return self._create_repo(self._json(body))
        if method == 'POST' and path == '/api/validate-yaml':
            return self._validate_yaml(self._json(body))
        if method == 'GET' and path == '/api/whoami-v2':
            return self._whoami()
        if method == 'GET' and path == '/api/agent-harnesses':  # huggingface_hub 2.x user-agent telemetry
            return self._send_json({'standardEnvVars': [], 'harnesses': {}})
        if len(parts) >= 4 and parts[0] == 'api' and parts[1] == 'models':
            repo = self._repo('/'.join(parts[2:4]))
            rest = [unquote(p) for p in parts[4:]]
            if method == 'GET' and not rest:
                return self._repo_info(repo, 'main')
            if method == 'GET' and len(rest) == 2 and rest[0] == 'revision':
                return self._repo_info(repo, rest[1])
            if method == 'GET' and rest == ['refs']:
                return self._refs(repo)
            if method == 'POST' and len(rest) == 2 and rest[0] == 'branch':
                return self._create_branch(repo, rest[1], self._json(body))
            if method == 'POST' and len(rest) == 2 and rest[0] == 'preupload':
                return self._preupload(repo, rest[1], self._json(body))
            if method == 'POST' and len(rest) == 2 and rest[0] == 'commit':
                if query.get('create_pr'):
                    raise HubError(400, 'Pull requests are not supported by the fake hub')
                return self._commit(repo, rest[1], body)
        if method in ('GET', 'HEAD') and len(parts) >= 5 and parts[2] == 'resolve':
            repo = self._repo('/'.join(parts[:2]))
            return self._resolve(repo, unquote(parts[3]), unquote('/'.join(parts[4:])), head=method == 'HEAD')
        raise HubError(404, f'Fake hub has no route for {method} {path}')

    # ------------------------------------------------------------------ endpoints

    def _authorized(self) -> bool:
        return bool(self.headers.get('Authorization', '').startswith('Bearer '))

    def _repo(self, repo_id: str) -> Repo:
        repo = self.state.repos.get(unquote(repo_id))
        if repo is None or (repo.private and not self._authorized()):
            raise HubError(404, 'Repository not found', code='RepoNotFound')
        return repo

    def _commit_for(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f'Invalid rev id: {revision}', code='RevisionNotFound')
        return commit

    def _create_repo(self, payload: Dict[str, Any]) -> None:
        if not self._authorized():
            raise HubError(401, 'Invalid username or password.')
        if payload.get('type', 'model') not in (None, 'model'):
            raise HubError(400, 'Fake hub only supports model repos')
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f'{self._base_url()}/{repo_id}'
        if repo_id in self.state.repos:
            # the client reads the url of the existing repo from the 409 answer when exist_ok=True
            raise HubError(409, 'You already created this model repo', extra={'url': url})
        private = bool(payload.get('private')) or payload.get('visibility') == 'private'
        repo = Repo(repo_id=repo_id, private=private)
        commit = self.state.new_commit(repo, {'.gitattributes': GITATTRIBUTES}, 'initial commit', None)
        repo.branches['main'] = commit.oid
        self.state.repos[repo_id] = repo
        self._send_json({'url': url, 'name': repo_id, 'id': repo_id})

    def _validate_yaml(self, payload: Dict[str, Any]) -> None:
        content = payload.get('content', '')
        errors = []
        if content.startswith('---'):
            end = content.find('\n---', 3)
            if end < 0:
                errors.append({'message': 'Unterminated YAML front matter'})
            elif yaml is not None:
                try:
                    meta = yaml.safe_load(content[3:end])
                    if meta is not None and not isinstance(meta, dict):
                        errors.append({'message': 'YAML front matter must be a mapping'})
                except yaml.YAMLError as e:
                    errors.append({'message': f'Invalid YAML: {e}'})
        self._send_json({'errors': errors, 'warnings': []}, status=400 if errors else 200)

    def _whoami(self) -> None:
        if not self._authorized():
            raise HubError(401, 'Invalid credentials in Authorization header')
        self._send_json({'type': 'user', 'name': USER, 'orgs': [], 'auth': {'type': 'access_token'}})

    def _repo_info(self, repo: Repo, revision: str) -> None:
        commit = self._commit_for(repo, revision)
        self._send_json({
            'id': repo.repo_id,
            'modelId': repo.repo_id,
            'sha': commit.oid,
            'private': repo.private,
            'siblings': [{'rfilename': name, 'size': len(data)} for name, data in sorted(commit.files.items())],
            'tags': [],
        })

    def _refs(self, repo: Repo) -> None:
        branches = [
            {'name': name, 'ref': f'refs/heads/{name}', 'targetCommit': oid} for name, oid in repo.branches.items()]
        self._send_json({'branches': branches, 'tags': [], 'converts': []})

    def _create_branch(self, repo: Repo, branch: str, payload: Dict[str, Any]) -> None:
        if not self._authorized():
            raise HubError(401, 'Invalid username or password.')
        if branch in repo.branches:
            raise HubError(409, f'Reference already exists: refs/heads/{branch}')
        start = self._commit_for(repo, payload.get('startingPoint') or 'main')
        repo.branches[branch] = start.oid
        self._send_json({})

    def _preupload(self, repo: Repo, revision: str, payload: Dict[str, Any]) -> None:
        commit = self._commit_for(repo, revision)
        files = []
        for item in payload.get('files', []):
            existing = commit.files.get(item['path'])
            files.append({
                'path': item['path'],
                'uploadMode': 'regular',  # never ask for LFS / Xet: content travels inline in the commit
                'shouldIgnore': False,
                'oid': git_blob_sha1(existing) if existing is not None else None,
            })
        self._send_json({'files': files, 'commitOid': commit.oid})

    def _commit(self, repo: Repo, revision: str, body: bytes) -> None:
        if not self._authorized():
            raise HubError(401, 'Invalid username or password.')
        parent = self._commit_for(repo, revision)
        if revision not in repo.branches:
            raise HubError(400, f'Can only commit to a branch, got {revision}')
        files = dict(parent.files)
        title = ''
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item['key'], item['value']
            if key == 'header':
                title = value.get('summary', '')
                if value.get('parentCommit') and value['parentCommit'] != parent.oid:
                    raise HubError(412, 'A commit has happened since. Please refresh and try again.')
            elif key == 'file':
                if value.get('encoding') != 'base64':
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')}")
                files[value['path']] = base64.b64decode(value['content'])
            elif key == 'deletedFile':
                files.pop(value['path'], None)
            elif key == 'deletedFolder':
                prefix = value['path'].rstrip('/') + '/'
                files = {k: v for k, v in files.items() if not k.startswith(prefix)}
            else:
                raise HubError(422, f'Fake hub does not support commit operation {key!r} (no LFS/Xet storage)')
        commit = self.state.new_commit(repo, files, title, parent.oid)
        repo.branches[revision] = commit.oid
        self._send_json({
            'commitUrl': f'{self._base_url()}/{repo.repo_id}/commit/{commit.oid}',
            'commitOid': commit.oid,
            'success': True,
            'pullRequestUrl': None,
        })

    def _resolve(self, repo: Repo, revision: str, filename: str, head: bool) -> None:
        commit = self._commit_for(repo, revision)
        data = commit.files.get(filename)
        if data is None:
            raise HubError(404, 'Entry not found', code='EntryNotFound', commit=commit.oid)
        headers = {
            'Content-Type': 'application/octet-stream',
            'Content-Length': str(len(data)),
            'ETag': f'"{hashlib.sha256(data).hexdigest()}"',
            'X-Repo-Commit': commit.oid,
            'Accept-Ranges': 'bytes',
        }
        status, payload = 200, data
        byte_range = self.headers.get('Range', '')
        if byte_range.startswith('bytes=') and not head:
            start, _, end = byte_range[len('bytes='):].partition('-')
            start_i = int(start or 0)
            end_i = int(end) if end else len(data) - 1
            payload = data[start_i:end_i + 1]
            status = 206
            headers['Content-Range'] = f'bytes {start_i}-{end_i}/{len(data)}'
            headers['Content-Length'] = str(len(payload))
        self._send(status, payload, headers, head=head)

    def _base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f'http://{host}:{port}'


class FakeHub:
    """Run the fake Hub on 127.0.0.1 (random free port) in a daemon thread; use as a context manager."""

    def __init__(self):
        self.state = HubState()
        handler = type('FakeHubHandler', (_Handler,), {'state': self.state})
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), handler)
        self.httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f'http://{host}:{port}'

    def start(self) -> 'FakeHub':
        self._thread = threading.Thread(target=self.httpd.serve_forever, name='fake-hub', daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> 'FakeHub':
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def set_failure(self, mode: Optional[str], status: int = 500) -> None:
        """``mode``: None (healthy), 'all' (every request fails) or 'commit' (only commits fail)."""
        assert mode in (None, 'all', 'commit'), mode
        with self.state.lock:
            self.state.fail_mode, self.state.fail_status = mode, status

    def files(self, repo_id: str, revision: str = 'main') -> Dict[str, bytes]:
        """Files of a repo at a branch or commit, as the server stores them."""
        with self.state.lock:
            commit = self.state.repos[repo_id].resolve(revision)
            assert commit is not None, f'{repo_id}@{revision} not found'
            return dict(commit.files)

    def repo(self, repo_id: str) -> Repo:
        with self.state.lock:
            return self.state.repos[repo_id]


def file_url(base_url: str, repo_id: str, filename: str, revision: str = 'main') -> str:
    """Download URL of a file, like ``huggingface_hub.hf_hub_url`` builds it."""
    return f"{base_url}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"


if __name__ == '__main__':  # manual poking: python tests/hub_server.py
    import time
    with FakeHub() as hub:
        print(f'fake hub at {hub.url} (Ctrl-C to stop)', flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
