"""A small client for ``mlx-intent serve``, standard library only, so the assistant needs no extra package.

client = IntentClient()
client.classify("ferry to Kadıköy?")["primary_intent"]
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

DEFAULT_URL = "http://127.0.0.1:8765"


class ClientError(Exception):
    """The server refused or failed (``status`` and its ``error`` message), or could not be reached
    (``status`` None).  ``retry_after`` is the server's Retry-After in seconds, when it sent one."""

    def __init__(self, message: str, status: int | None = None, detail: Any = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.detail, self.retry_after = status, detail, retry_after


class Event(NamedTuple):
    """One server-sent event: ``token`` ({"text"}), ``result`` (the answer) or ``error``."""

    name: str
    data: Any


class IntentClient:
    def __init__(self, base_url: str = DEFAULT_URL, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def classify(self, text: str, mode: str | None = None) -> dict:
        return self._json("POST", "/v1/classify", {"text": text, **({"mode": mode} if mode else {})})

    def classify_batch(self, texts: list[str], mode: str | None = None) -> list[dict]:
        return self._json("POST", "/v1/classify/batch", {"texts": texts, **({"mode": mode} if mode else {})})["results"]

    def stream(self, text: str) -> Iterator[Event]:
        """The constrained generation as it is written: ``token`` events, then one ``result`` event."""
        with self._open("POST", "/v1/classify/stream", {"text": text}) as response:
            yield from events(raw.decode("utf-8").rstrip("\r\n") for raw in response)

    def health(self) -> dict:
        """The health body, ready or not: a 503 here means "not ready yet", not a failure."""
        try:
            return self._json("GET", "/healthz")
        except ClientError as e:
            if e.status == 503 and isinstance(e.detail, dict) and "ready" in e.detail:
                return e.detail
            raise

    def models(self) -> list[dict]:
        return self._json("GET", "/v1/models")["models"]

    def _json(self, method: str, path: str, body: dict | None = None) -> Any:
        with self._open(method, path, body) as response:
            return json.loads(response.read())

    def _open(self, method: str, path: str, body: dict | None):
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise _refusal(e) from None
        except (urllib.error.URLError, OSError) as e:
            raise ClientError(f"cannot reach {self.base_url}: {getattr(e, 'reason', e)}") from None


def events(lines: Iterable[str]) -> Iterator[Event]:
    """Server-sent events from their lines (without line ends); ``data`` is JSON."""
    name, data = "message", []
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield Event(name, json.loads("\n".join(data)))
            name, data = "message", []


def _refusal(e: urllib.error.HTTPError) -> ClientError:
    """The server's {"error", "detail"} as a ClientError; a body in another shape is kept whole as detail."""
    try:
        body = json.loads(e.read() or b"null")
    except ValueError:
        body = None
    message = body.get("error") if isinstance(body, dict) else None
    detail = body.get("detail", body) if isinstance(body, dict) and "error" in body else body
    retry = e.headers.get("Retry-After")
    return ClientError(
        f"{e.code} {message or e.reason}",
        status=e.code,
        detail=detail,
        retry_after=float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
    )
