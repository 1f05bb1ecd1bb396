"""The host-side bridge: the one door between sandboxes and every authenticated service.

Checks, in order: the peer address is in the sandbox subnet (before a byte of HTTP is parsed;
nftables drops everything else before that), the run token's signature, expiry and revocation,
the token's address is the caller's, and the connection is in the token's scope. Then the
stored credential is attached host-side and the call forwarded, streaming both ways.
"""
