"""The SDK an agent imports: ``from corral_runner import sdk``.

    sdk.log("fetched prices", rows=120)
    sdk.progress(0.5, "charting")
    sdk.metric("rows", 120)
    sdk.context()["run_id"]
    prices = sdk.request("market", "GET", "/v1/prices/ACME").json()
    OpenAI(base_url=sdk.bridge_url("openai") + "/v1", api_key=sdk.token())

Everything here goes through the bridge. The only secret-like thing in it is the run token,
which works only from this sandbox, only for this run's connections, only until it ends.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Mapping

from .events import Channel

_channel: Channel | None = None
_context: dict[str, Any] = {}
_bridge = ""
_token = ""


def _bind(channel: Channel, context: dict[str, Any], bridge: str, token: str) -> None:
    global _channel, _context, _bridge, _token
    _channel = channel
    _context = dict(context)
    _bridge, _token = bridge.rstrip("/"), token


def _emit(kind: str, **data: Any) -> None:
    if _channel is None:
        raise RuntimeError("corral_runner.sdk is only usable inside a Corral run")
    _channel.emit(kind, **data)


def log(message: str, **fields: Any) -> None:
    """A structured log line, kept in the run's event log."""
    _emit("log", stream="sdk", message=str(message), fields=fields)


def progress(fraction: float, message: str = "") -> None:
    """How far the agent is, from 0.0 to 1.0."""
    value = float(fraction)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"progress must be between 0 and 1, got {value}")
    _emit("progress", fraction=value, message=str(message))


def metric(name: str, value: float, **labels: str) -> None:
    """A numeric observation, aggregated by the host."""
    _emit("metric", name=str(name), value=float(value), labels=labels)


def context() -> dict[str, Any]:
    """Who and what this run is: run id, environment, entrypoint."""
    return dict(_context)


def token() -> str:
    """This run's token: the api_key to give an SDK pointed at the bridge."""
    return _token


def bridge_url(connection: str = "") -> str:
    """The bridge's URL for ``connection`` (e.g. ``openai``, ``github``, ``market``)."""
    return _bridge + ("/" + connection if connection else "")


class Response:
    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, dict(headers), body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def request(
    connection: str,
    method: str,
    path: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Response:
    """Call ``path`` on ``connection`` through the bridge; the bridge attaches the credential."""
    data = None
    sent = {"authorization": "Bearer " + _token}
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent["content-type"] = (
            "application/octet-stream" if isinstance(body, bytes) else "application/json"
        )
    sent.update(headers or {})
    url = bridge_url(connection) + "/" + path.lstrip("/")
    req = urllib.request.Request(url, data=data, method=method.upper(), headers=sent)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return Response(response.status, dict(response.headers.items()), response.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, dict(error.headers.items()), error.read())
