"""The outbound HTTP client against real servers on loopback: timeouts, size caps, TLS that is
verified, redirects that stay home unless asked; and the test transport.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from corral.errors import DeliveryFailed, OutboundError, UnusableURL
from corral.outbound import Client, HTTPTransport, MockTransport, Request, Response
from corral.pipeline.webhooks import post


class Seen:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []


class Handler(BaseHTTPRequestHandler):
    """``/big``: 10 KiB of body; ``/to/<path>``: 302 to ``<path>``; ``/307``: a 307 to /ok;
    ``/elsewhere/<port>``: 302 to the same path on another port; ``/silent``: never answers;
    anything else: 200 and the request echoed."""

    seen: Seen
    stop: threading.Event

    def do_GET(self) -> None:
        self.answer()

    def do_POST(self) -> None:
        self.answer()

    def answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        self.seen.requests.append((self.command, self.path, dict(self.headers.items()), body))
        if self.path == "/silent":
            self.stop.wait(5)
            return
        status, headers, out = 200, {}, self.command.encode() + b" " + body
        if self.path == "/big":
            out = b"x" * 10240
        elif self.path.startswith("/to/"):
            status, headers = 302, {"location": self.path[3:]}
        elif self.path == "/307":
            status, headers = 307, {"location": "/ok"}
        elif self.path.startswith("/elsewhere/"):
            port = self.path.split("/")[2]
            status, headers = 302, {"location": f"http://127.0.0.1:{port}/ok"}
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.seen, self.stop = Seen(), threading.Event()
        handler = type("H", (Handler,), {"seen": self.seen, "stop": self.stop})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    made = Server()
    yield made
    made.close()


@pytest.fixture
def other() -> Iterator[Server]:
    made = Server()
    yield made
    made.close()


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_a_post_and_its_answer(server: Server) -> None:
    answer = Client().request(
        "POST", server.url("/hook?x=1"), headers={"X-Sign": "abc"}, body=b'{"a":1}'
    )
    assert (answer.status, answer.body, answer.truncated, answer.ok) == (
        200,
        b'POST {"a":1}',
        False,
        True,
    )
    method, path, headers, body = server.seen.requests[0]
    assert (method, path, headers["X-Sign"], body) == ("POST", "/hook?x=1", "abc", b'{"a":1}')
    assert answer.headers["content-length"] == "12"  # names in lowercase


def test_an_answer_is_read_up_to_the_limit(server: Server) -> None:
    answer = Client(limit=1024).request("GET", server.url("/big"))
    assert len(answer.body) == 1024 and answer.truncated
    assert not Client().request("GET", server.url("/big")).truncated


def test_no_answer_in_time_is_an_outbound_error(server: Server) -> None:
    with pytest.raises(OutboundError, match="timed out"):
        Client(timeout=0.2).request("GET", server.url("/silent"))


def test_a_refused_connection_is_an_outbound_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(OutboundError, match="ConnectionRefusedError"):
            Client().request("GET", f"http://127.0.0.1:{port}/")


def test_tls_is_verified(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = Server(tls)
    try:
        with pytest.raises(OutboundError, match="CERTIFICATE_VERIFY_FAILED"):
            Client().request("GET", server.url("/ok"))
        assert server.seen.requests == []  # nothing was sent over the unverified channel
        trusting = ssl.create_default_context(cafile=str(cert))
        answer = Client(HTTPTransport(trusting)).request("GET", server.url("/ok"))
        assert answer.status == 200 and answer.body == b"GET "
    finally:
        server.close()


def test_redirects_are_answers_unless_asked(server: Server) -> None:
    answer = Client().request("POST", server.url("/to/ok"), body=b"secret")
    assert answer.status == 302 and len(server.seen.requests) == 1


def test_a_followed_redirect_is_a_get_without_the_body(server: Server) -> None:
    answer = Client().request(
        "POST",
        server.url("/to/to/landed"),
        headers={"Content-Type": "text/plain", "Authorization": "Bearer t"},
        body=b"secret",
        follow=5,
    )
    assert answer.status == 200 and answer.url == server.url("/landed")
    assert [(m, p, b) for m, p, _, b in server.seen.requests] == [
        ("POST", "/to/to/landed", b"secret"),
        ("GET", "/to/landed", b""),
        ("GET", "/landed", b""),
    ]
    assert server.seen.requests[2][2]["Authorization"] == "Bearer t"  # the same origin
    assert "Content-Type" not in server.seen.requests[2][2]


def test_redirects_stop_at_the_count(server: Server) -> None:
    answer = Client().request("GET", server.url("/to/to/to/end"), follow=2)
    assert answer.status == 302 and len(server.seen.requests) == 3


def test_a_307_is_never_followed(server: Server) -> None:
    answer = Client().request("POST", server.url("/307"), body=b"secret", follow=5)
    assert answer.status == 307 and len(server.seen.requests) == 1


def test_a_redirect_to_another_host_is_followed_only_when_asked(
    server: Server, other: Server
) -> None:
    url = server.url(f"/elsewhere/{other.port}")
    headers = {"Authorization": "Bearer t", "X-Other": "kept"}
    stayed = Client().request("GET", url, headers=headers, follow=5)
    assert stayed.status == 302 and other.seen.requests == []
    went = Client().request("GET", url, headers=headers, follow=5, other_hosts=True)
    assert went.status == 200 and went.url == other.url("/ok")
    sent = other.seen.requests[0][2]
    assert "Authorization" not in sent and sent["X-Other"] == "kept"  # no credential travels


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "http://", "file:///etc/passwd", "http://host:port/", "x"]
)
def test_an_unusable_url_is_refused_before_anything_is_sent(url: str) -> None:
    transport = MockTransport(lambda request: Response(200, {}, b""))
    with pytest.raises(UnusableURL):
        Client(transport).request("GET", url)
    assert transport.requests == []


def test_the_test_transport_records_and_answers() -> None:
    transport = MockTransport(lambda request: Response(201, {"X-Id": "7"}, request.body * 3))
    answer = Client(transport, limit=4).request("PUT", "https://api.test/v1", body=b"ab")
    assert transport.requests == [Request("PUT", "https://api.test/v1", {}, b"ab")]
    assert (answer.status, answer.headers, answer.body, answer.truncated) == (
        201,
        {"x-id": "7"},
        b"abab",
        True,
    )


@pytest.mark.parametrize(
    ("answer", "reason", "permanent"),
    [
        (Response(503, {}, b""), "the receiver answered HTTP 503", False),
        (Response(302, {"location": "/elsewhere"}, b""), "the receiver answered HTTP 302", False),
    ],
)
def test_a_webhook_that_is_not_taken_is_retried(
    answer: Response, reason: str, permanent: bool
) -> None:
    transport = MockTransport(lambda request: answer)
    with pytest.raises(DeliveryFailed) as failed:
        post(Client(transport), "https://hooks.test/x", b"{}", {}, timeout=1.0)
    assert (failed.value.reason, failed.value.permanent) == (reason, permanent)
    assert len(transport.requests) == 1  # no redirect followed


def test_a_webhook_url_that_cannot_work_fails_for_good() -> None:
    transport = MockTransport(lambda request: Response(200, {}, b""))
    with pytest.raises(DeliveryFailed) as failed:
        post(Client(transport), "ftp://hooks.test/x", b"{}", {}, timeout=1.0)
    assert failed.value.permanent and transport.requests == []
    assert post(Client(transport), "https://hooks.test/x", b"{}", {}, timeout=1.0) == 200
