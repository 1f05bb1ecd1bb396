"""A local stand-in for Slack's Web API: ``chat.postMessage`` and ``auth.test``.

Slack answers nearly everything with HTTP 200 and says what went wrong in the body: a
missing token is ``{"ok": false, "error": "not_authed"}``, a wrong one ``invalid_auth``. The
token travels as ``Authorization: Bearer xoxb-...``; arguments come as JSON or as a form.
"""

from __future__ import annotations

import itertools
import json
import time
import zlib
from typing import Any

from tests.fakes.base import FakeService, RecordedRequest, Response


def slack_error(error: str, status: int = 200, **extra: Any) -> Response:
    """Slack's failure shape, ``{"ok": false, "error": CODE}``."""
    return Response.json({"ok": False, "error": error, **extra}, status)


class FakeSlack(FakeService):
    """``POST /api/chat.postMessage`` and ``POST /api/auth.test``.

    ``FakeSlack(token=None, *, team="Fake Team", bot_user="U0FAKEBOT", host, port, delay)``:
    with ``token`` the server demands ``Authorization: Bearer <token>``. Posted messages are
    kept in ``posted`` (``{"channel", "ts", "text", "blocks", ...}``).
    """

    server_name = "fake-slack"

    def __init__(
        self,
        token: str | None = None,
        *,
        team: str = "Fake Team",
        bot_user: str = "U0FAKEBOT",
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
    ) -> None:
        super().__init__(host, port, delay=delay)
        self.token = token
        self.team = team
        self.bot_user = bot_user
        self.posted: list[dict[str, Any]] = []
        self._serial = itertools.count(1)
        if token is not None:
            self.expect_auth("Authorization", f"Bearer {token}")
        self.add_route("POST", "/api/chat.postMessage", self.post_message)
        self.add_route("POST", "/api/auth.test", self.auth_test)
        self.add_route("GET", "/api/auth.test", self.auth_test)

    @staticmethod
    def channel_id(channel: str) -> str:
        """The ID a channel name resolves to (an ID such as ``C0123`` stays as it is)."""
        if channel[:1] in ("C", "G", "D") and channel[1:].isalnum() and channel.isupper():
            return channel
        return f"C{zlib.crc32(channel.lstrip('#').encode()):010d}"

    # Error shapes --------------------------------------------------------------------------

    def auth_error(self, request: RecordedRequest) -> Response:
        return slack_error("invalid_auth" if "authorization" in request.headers else "not_authed")

    def not_found(self, request: RecordedRequest) -> Response:
        method = request.path.removeprefix("/api/")
        return slack_error("unknown_method", 404, req_method=method)

    def method_not_allowed(self, request: RecordedRequest) -> Response:
        return slack_error("method_not_supported_for_channel_type", 405)

    def bad_request(self, message: str) -> Response:
        return slack_error("invalid_form_data")

    # Endpoints -----------------------------------------------------------------------------

    def _arguments(self, request: RecordedRequest) -> tuple[dict[str, Any], list[str]] | None:
        """The call's arguments (query string, then JSON or form body) and any warnings."""
        arguments: dict[str, Any] = {k: v[-1] for k, v in request.query.items()}
        content_type = request.headers.get("Content-Type", "").lower()
        warnings: list[str] = []
        if content_type.startswith("application/json"):
            if "charset" not in content_type:
                warnings.append("missing_charset")
            try:
                payload = json.loads(request.body or b"{}")
            except ValueError:
                return None
            if not isinstance(payload, dict):
                return None
            arguments.update(payload)
        elif request.body:
            arguments.update(request.form())
        return arguments, warnings

    def post_message(self, request: RecordedRequest) -> Response:
        parsed = self._arguments(request)
        if parsed is None:
            return slack_error("invalid_json")
        arguments, warnings = parsed
        channel = arguments.get("channel")
        if not channel:
            return slack_error("channel_not_found")
        text = arguments.get("text")
        blocks = arguments.get("blocks")
        if isinstance(blocks, str):
            try:
                blocks = json.loads(blocks)
            except ValueError:
                return slack_error("invalid_blocks_format")
        if not text and not blocks and not arguments.get("attachments"):
            return slack_error("no_text")
        ts = f"{int(time.time())}.{next(self._serial):06d}"
        message: dict[str, Any] = {
            "type": "message",
            "subtype": "bot_message",
            "text": text or "",
            "user": self.bot_user,
            "bot_id": "B0FAKEBOT",
            "ts": ts,
        }
        if blocks:
            message["blocks"] = blocks
        if arguments.get("thread_ts"):
            message["thread_ts"] = arguments["thread_ts"]
        channel_id = self.channel_id(str(channel))
        with self._lock:
            self.posted.append({"channel": channel_id, **message})
        answer: dict[str, Any] = {"ok": True, "channel": channel_id, "ts": ts, "message": message}
        if warnings:
            answer["warning"] = ",".join(warnings)
            answer["response_metadata"] = {"warnings": warnings}
        return Response.json(answer, headers={"Content-Type": "application/json; charset=utf-8"})

    def auth_test(self, request: RecordedRequest) -> Response:
        return Response.json(
            {
                "ok": True,
                "url": "https://fake-team.slack.com/",
                "team": self.team,
                "user": "corral-bot",
                "team_id": "T0FAKETEAM",
                "user_id": self.bot_user,
                "bot_id": "B0FAKEBOT",
                "is_enterprise_install": False,
            },
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
