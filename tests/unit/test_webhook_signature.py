"""Webhook signatures as a receiver checks them: ``verify_signature`` against ``sign``."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from corral.pipeline.webhooks import RetryPolicy, sign, verify_signature

SECRET = "whsec-test-0123456789"
BODY = b'{"event":"run.finished","run_id":"run-1","status":"succeeded"}'
NOW = 1_900_000_000


def test_a_signed_body_verifies() -> None:
    header = sign(SECRET, BODY, NOW)
    assert verify_signature(SECRET, header, BODY, now=NOW)
    assert verify_signature(SECRET, header, BODY.decode(), now=NOW + 299)  # str bodies too


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, BODY, NOW) == f"t={NOW},v1={expected}"


@pytest.mark.parametrize(
    "body",
    [
        BODY.replace(b"succeeded", b"failed"),
        BODY + b" ",
        BODY[:-1],
        b"",
    ],
)
def test_a_tampered_body_is_refused(body: bytes) -> None:
    assert not verify_signature(SECRET, sign(SECRET, BODY, NOW), body, now=NOW)


def test_another_secret_is_refused() -> None:
    assert not verify_signature("whsec-other", sign(SECRET, BODY, NOW), BODY, now=NOW)
    assert not verify_signature(SECRET, sign("whsec-other", BODY, NOW), BODY, now=NOW)


@pytest.mark.parametrize("skew", [301, -301, 86_400])
def test_a_stale_or_future_timestamp_is_refused(skew: int) -> None:
    assert not verify_signature(SECRET, sign(SECRET, BODY, NOW), BODY, now=NOW + skew)
    assert verify_signature(
        SECRET, sign(SECRET, BODY, NOW), BODY, now=NOW + skew, tolerance=abs(skew)
    )


def test_a_replayed_signature_with_a_new_timestamp_is_refused() -> None:
    mac = sign(SECRET, BODY, NOW).split("v1=")[1]
    assert not verify_signature(SECRET, f"t={NOW + 600},v1={mac}", BODY, now=NOW + 600)


@pytest.mark.parametrize(
    "header",
    [None, "", "garbage", "t=abc,v1=00", f"t={NOW}", "v1=00", f"t={NOW},v1", f"t={NOW};v1=00"],
)
def test_malformed_headers_are_refused(header: str | None) -> None:
    assert not verify_signature(SECRET, header, BODY, now=NOW)


def test_any_of_several_signatures_may_match() -> None:
    good = sign(SECRET, BODY, NOW).split("v1=")[1]
    assert verify_signature(SECRET, f"t={NOW},v1={'0' * 64},v1={good}", BODY, now=NOW)


def test_retry_delays_double_up_to_the_cap() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=10.0)
    assert [policy.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
