"""A local API protected by OAuth 2 access tokens, with its own token endpoint.

``POST /oauth/token`` (RFC 6749) takes a form: ``grant_type=refresh_token`` with
``refresh_token``, or ``grant_type=client_credentials``; the client authenticates with
``client_id`` / ``client_secret`` in the form or with HTTP Basic. Each grant issues a NEW
access token and invalidates the previous one; with ``rotate_refresh_tokens`` it also issues
a new refresh token and the old one stops working (reusing it is ``invalid_grant``).

``GET /v1/data`` answers only the current, unexpired access token (``Authorization: Bearer``;
``expect_auth`` does not apply here);
anything else is 401 ``{"error": "invalid_token"}`` with a ``WWW-Authenticate`` header, as
RFC 6750 has it. ``expire_access_token()`` makes the next call fail that way.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import threading
import time
from typing import Any
from urllib.parse import unquote

from tests.fakes.base import FakeService, RecordedRequest, Response

DATA_ITEMS = [
    {"id": 1, "name": "alpha", "value": 10},
    {"id": 2, "name": "beta", "value": 20},
    {"id": 3, "name": "gamma", "value": 30},
]


def oauth_error(error: str, description: str, status: int = 400) -> Response:
    """A token endpoint error (RFC 6749 section 5.2)."""
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="fake-oauth"'
    return Response.json({"error": error, "error_description": description}, status, headers)


class FakeOAuthAPI(FakeService):
    """An OAuth 2 resource server plus its token endpoint.

    ``FakeOAuthAPI(*, client_id="corral-client", client_secret="corral-secret",
    refresh_token=None, access_token=None, expires_in=3600, rotate_refresh_tokens=False,
    host, port, delay)``: the initial tokens are random unless given and readable as
    ``access_token`` / ``refresh_token`` (the ones valid now). Counters: ``refresh_count``
    (successful refresh grants), ``token_requests`` (every call to the token endpoint),
    ``rejected_tokens`` (data calls refused). ``issued_access_tokens`` lists every token issued.
    """

    server_name = "fake-oauth"

    def __init__(
        self,
        *,
        client_id: str = "corral-client",
        client_secret: str = "corral-secret",
        refresh_token: str | None = None,
        access_token: str | None = None,
        expires_in: int = 3600,
        rotate_refresh_tokens: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
    ) -> None:
        super().__init__(host, port, delay=delay)
        self.client_id = client_id
        self.client_secret = client_secret
        self.expires_in = expires_in
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self._state = threading.Lock()
        self._generation = 0
        self.refresh_token: str | None = refresh_token or self._new_token("rt")
        self.access_token: str | None = access_token or self._new_token("at")
        self._access_expires_at = time.monotonic() + expires_in
        self.issued_access_tokens: list[str] = [self.access_token]
        self.refresh_count = 0
        self.token_requests = 0
        self.rejected_tokens = 0
        self.add_route("POST", "/oauth/token", self.token_endpoint, auth=False)
        self.add_route("GET", "/v1/data", self.get_data)

    def _new_token(self, kind: str) -> str:
        self._generation += 1
        return f"{kind}-{self._generation}-{secrets.token_hex(12)}"

    # Test controls -------------------------------------------------------------------------

    def expire_access_token(self) -> None:
        """Make the current access token invalid, as if it had expired."""
        with self._state:
            self._access_expires_at = 0.0

    def revoke_refresh_token(self) -> None:
        """Make the current refresh token invalid (the next refresh is ``invalid_grant``)."""
        with self._state:
            self.refresh_token = None

    def access_token_valid(self, token: str) -> bool:
        """Whether ``token`` is the current, unexpired access token."""
        with self._state:
            return (
                self.access_token is not None
                and secrets.compare_digest(token, self.access_token)
                and time.monotonic() < self._access_expires_at
            )

    # Endpoints -----------------------------------------------------------------------------

    def _client_credentials(
        self, request: RecordedRequest, form: dict[str, str]
    ) -> tuple[str, str]:
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "basic" and encoded:
            try:
                decoded = base64.b64decode(encoded.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return "", ""
            client_id, _, client_secret = decoded.partition(":")
            return unquote(client_id), unquote(client_secret)
        return form.get("client_id", ""), form.get("client_secret", "")

    def token_endpoint(self, request: RecordedRequest) -> Response:
        with self._state:
            self.token_requests += 1
        content_type = request.headers.get("Content-Type", "").lower()
        if not content_type.startswith("application/x-www-form-urlencoded"):
            return oauth_error("invalid_request", "the body must be a form (urlencoded)")
        form = request.form()
        client_id, client_secret = self._client_credentials(request, form)
        if client_id != self.client_id or not secrets.compare_digest(
            client_secret, self.client_secret
        ):
            return oauth_error("invalid_client", "client authentication failed", 401)
        grant_type = form.get("grant_type")
        if grant_type == "refresh_token":
            presented = form.get("refresh_token")
            if not presented:
                return oauth_error("invalid_request", "refresh_token is required")
            with self._state:
                if self.refresh_token is None or not secrets.compare_digest(
                    presented, self.refresh_token
                ):
                    return oauth_error("invalid_grant", "the refresh token is invalid or revoked")
                self.refresh_count += 1
                if self.rotate_refresh_tokens:
                    self.refresh_token = self._new_token("rt")
                answer = self._issue()
                answer["refresh_token"] = self.refresh_token
        elif grant_type == "client_credentials":
            with self._state:
                answer = self._issue()
        elif grant_type is None:
            return oauth_error("invalid_request", "grant_type is required")
        else:
            return oauth_error("unsupported_grant_type", f"grant_type {grant_type!r} unsupported")
        if form.get("scope"):
            answer["scope"] = form["scope"]
        return Response.json(answer, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _issue(self) -> dict[str, Any]:
        """A new access token, replacing the current one (call with ``_state`` held)."""
        self.access_token = self._new_token("at")
        self._access_expires_at = time.monotonic() + self.expires_in
        self.issued_access_tokens.append(self.access_token)
        return {
            "access_token": self.access_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
        }

    def authorize(self, request: RecordedRequest) -> bool:
        """Only the current, unexpired access token opens ``/v1/data``."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.access_token_valid(token.strip())

    def auth_error(self, request: RecordedRequest) -> Response:
        with self._state:
            self.rejected_tokens += 1
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            # RFC 6750 3.1: a request without a token gets no error code in the challenge.
            return Response.json(
                {"error": "invalid_token", "error_description": "no access token"},
                401,
                {"WWW-Authenticate": 'Bearer realm="fake-oauth"'},
            )
        description = "the access token expired or was revoked"
        return Response.json(
            {"error": "invalid_token", "error_description": description},
            401,
            {
                "WWW-Authenticate": (
                    f'Bearer realm="fake-oauth", error="invalid_token", '
                    f'error_description="{description}"'
                )
            },
        )

    def get_data(self, request: RecordedRequest) -> Response:
        token = request.headers["Authorization"].partition(" ")[2].strip()
        with self._state:
            serial = self.issued_access_tokens.index(token) + 1
        return Response.json({"items": DATA_ITEMS, "token_serial": serial})
