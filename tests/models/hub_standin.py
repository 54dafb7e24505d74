"""A stand-in Hugging Face Hub on 127.0.0.1: what `hf_hub_download` asks of the real one.

HEAD and GET on `/{repo_id}/resolve/{revision}/{filename}` answer with `X-Repo-Commit`, `ETag` (the
file's sha256, as the Hub gives for LFS files) and `Content-Length`; GET honours `Range: bytes=N-`
with 206 and `Content-Range`. A gated repo answers 401 with `X-Error-Code: GatedRepo` unless the
request carries its token; an unknown file 404 with `X-Error-Code: EntryNotFound`. `drop_once` names
files whose first GET stops halfway and closes the connection (a dropped transfer).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class StandInHub:
    files: dict[tuple[str, str], bytes]  # (repo_id, filename) -> content
    gated: dict[str, str] = field(default_factory=dict)  # repo_id -> the token it accepts
    drop_once: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, str | None, bool]] = field(default_factory=list)  # method, path, Range, had a token

    def __enter__(self) -> StandInHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _resolve(self) -> tuple[bytes | None, dict[str, str], int]:
                auth = self.headers.get("Authorization")
                hub.requests.append((self.command, self.path, self.headers.get("Range"), auth is not None))
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return None, {"X-Error-Code": "RepoNotFound"}, 404
                repo_id, filename = "/".join(parts[:2]), "/".join(parts[4:])
                if repo_id in hub.gated and auth != f"Bearer {hub.gated[repo_id]}":
                    return (
                        None,
                        {"X-Error-Code": "GatedRepo", "X-Error-Message": f"Access to model {repo_id} is restricted."},
                        401,
                    )
                content = hub.files.get((repo_id, filename))
                if content is None:
                    return None, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, 404
                return content, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(content).hexdigest()}"'}, 200

            def _headers(self, status: int, headers: dict[str, str], length: int) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def do_HEAD(self) -> None:
                content, headers, status = self._resolve()
                self._headers(status, headers, len(content) if content is not None else 0)

            def do_GET(self) -> None:
                content, headers, status = self._resolve()
                if content is None:
                    self._headers(status, headers, 0)
                    return
                start = 0
                wanted = self.headers.get("Range")
                if wanted and wanted.startswith("bytes="):
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                    headers = {**headers, "Content-Range": f"bytes {start}-{len(content) - 1}/{len(content)}"}
                    status = 206
                body = content[start:]
                self._headers(status, headers, len(body))
                name = self.path.rsplit("/", 1)[-1]
                if name in hub.drop_once and start == 0:
                    hub.drop_once.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def gets(self, filename: str) -> list[str | None]:
        """The Range header of every GET of `filename` (None: the whole file)."""
        return [r for method, path, r, _ in self.requests if method == "GET" and path.endswith("/" + filename)]

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
