"""A small client of the ledger admin API (standard library only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Any


class AdminError(Exception):
    """The admin API answered with an error (RFC 9457 problem details)."""

    def __init__(self, status: int, problem: dict[str, Any]):
        self.status = status
        self.problem = problem
        title = problem.get("title") or "error"
        detail = problem.get("detail")
        super().__init__(f"HTTP {status}: {title}" + (f": {detail}" if detail else ""))


def _problem(exc: urllib.error.HTTPError) -> AdminError:
    raw = exc.read()
    try:
        problem = json.loads(raw)
    except ValueError:
        problem = {"title": raw.decode(errors="replace")[:200]}
    if not isinstance(problem, dict):
        problem = {"title": str(problem)[:200]}
    return AdminError(exc.code, problem)


class AdminClient:
    def __init__(self, base_url: str, token: str, timeout_s: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def _url(self, path: str, query: dict[str, Any] | None) -> str:
        url = self.base_url + path
        params = {k: v for k, v in (query or {}).items() if v is not None and v != ""}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"admin URL must be http(s): {url}")
        return url

    def _open(self, req: urllib.request.Request, timeout_s: float | None = None) -> Any:
        try:
            return urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s)  # noqa: S310 - scheme checked
        except urllib.error.HTTPError as exc:
            raise _problem(exc) from None

    def _headers(self, token: str | None, content_type: str | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {token or self.token}", "Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        token: str | None = None,
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(  # noqa: S310 - scheme checked in _url
            self._url(path, query),
            data=data,
            method=method,
            headers=self._headers(token, "application/json" if data is not None else None),
        )
        with self._open(req) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def upload(self, path: str, source: IO[bytes], content_type: str, timeout_s: float) -> Any:
        """POST a file-like body as it is read (chunked transfer encoding)."""
        req = urllib.request.Request(  # noqa: S310 - scheme checked in _url
            self._url(path, None),
            data=source,
            method="POST",
            headers=self._headers(None, content_type),
        )
        with self._open(req, timeout_s) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def download(
        self, path: str, query: dict[str, Any] | None, sink: IO[bytes], accept: str
    ) -> int:
        """GET a body straight into ``sink`` (64 KiB at a time); return the bytes written."""
        headers = self._headers(None, None) | {"Accept": accept}
        req = urllib.request.Request(self._url(path, query), headers=headers)  # noqa: S310
        written = 0
        with self._open(req) as resp:
            while chunk := resp.read(64 * 1024):
                sink.write(chunk)
                written += len(chunk)
        sink.flush()
        return written
