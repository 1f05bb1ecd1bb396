"""The SDK an agent imports: ``from corral_runner import sdk``.

    sdk.log("fetched prices", rows=120)
    sdk.progress(0.5, "charting")
    sdk.metric("rows", 120)
    sdk.context()["run_id"]
    prices = sdk.request("market", "GET", "/v1/prices/ACME").json()
    OpenAI(base_url=sdk.bridge_url("openai") + "/v1", api_key=sdk.token())
    summary = sdk.call_agent("summarise", {"text": text})["result"]

Everything here goes through the bridge. The only secret-like thing in it is the run token,
which works only from this sandbox, only for this run's connections, only until it ends.
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: never imported at run time, so the runner loads fast
    from typing import Any, Mapping
from urllib.parse import quote

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
    import urllib.error  # lazily: see events.py
    import urllib.request

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


class AgentCallRefused(Exception):
    """The bridge refused to start the run: ``status`` and ``code`` say why.

    404 ``app_not_found``, 403 ``agent_call_forbidden`` (the app is not callable by agents),
    409 ``agent_call_refused`` (too deep, or a cycle: ``detail`` names the chain), 429
    ``concurrency_limit``, 402 ``budget_exhausted``, 400 ``invalid_input`` (the input fails
    the app's schema), 401 for a token that is not this run's.
    """

    def __init__(self, app: str, status: int, code: str, detail: str) -> None:
        super().__init__(f"calling agent {app!r} was refused ({status} {code}): {detail}")
        self.app, self.status, self.code, self.detail = app, status, code, detail


def call_agent(
    app: str, input: Any = None, wait: bool = True, timeout: float = 600.0
) -> dict[str, Any]:
    """Run the app ``app`` with ``input``, as this run's user, and return the run as JSON.

    With ``wait`` (the default) it returns once the run has ended or ``timeout`` seconds have
    passed; look at ``status`` (``succeeded``, ``failed``, ... or still ``queued``/``running``),
    then ``result`` or ``error_code`` and ``error``. Without ``wait`` it returns at once, the run
    queued. A run the bridge will not start raises ``AgentCallRefused``.
    """
    if not _bridge:
        raise RuntimeError("corral_runner.sdk is only usable inside a Corral run")
    sent: dict[str, Any] = {"input": input, "wait": bool(wait), "timeout": float(timeout)}
    path = "/apps/" + quote(app, safe="") + "/runs"
    # The bridge answers when the run ends; give it time past the wait to say so.
    answer = request("_corral", "POST", path, body=sent, timeout=float(timeout) + 30.0)
    decoded: Any = None
    with contextlib.suppress(ValueError):
        decoded = answer.json()
    if not answer.ok:
        shown = decoded if isinstance(decoded, dict) else {}
        raise AgentCallRefused(
            app,
            answer.status,
            str(shown.get("error", "http_" + str(answer.status))),
            str(shown.get("detail", answer.body[:200].decode("utf-8", "replace"))),
        )
    if not isinstance(decoded, dict):
        raise AgentCallRefused(app, answer.status, "bad_answer", "the bridge did not answer JSON")
    return decoded
