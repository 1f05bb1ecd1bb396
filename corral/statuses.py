"""The HTTP status of every error, as data: one row per ``CorralError.code``.

The API answers an error with ``STATUS`` (``corral/api/errors.py``), and so does the bridge
when a sandbox's agent-to-agent call is refused (``corral/bridge/agents.py``): one table, so
the same condition has the same status whichever door it comes through, and neither door
imports the other. Rows are keyed by code, the name a client sees in ``{"error": <code>}``;
every class drawn in ``corral/errors.py`` has its row (``tests/unit/test_errors.py``), each
with the reason for its status where the reason is not obvious.

``status_for`` walks the class's MRO, so a subclass added later without a row answers with
its family's status. A ``Refused`` is the bridge's own answer and carries its status with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from corral.errors import CorralError, Refused

STATUS: Final[Mapping[str, int]] = {
    "corral_error": 500,
    # A CORRAL_* variable on the server is malformed: nothing the client sent can fix that.
    "config_error": 500,
    "not_found": 404,
    "environment_not_found": 404,
    "snapshot_not_found": 404,
    "image_not_found": 404,
    # Over HTTP the server reads images only from its import directory: the path is well
    # formed, the server will not read it for this client.
    "import_forbidden": 403,
    "conflict": 409,  # includes the compare-and-swap loser of a racing freeze
    "environment_exists": 409,
    "environment_busy": 409,  # another edit session or freeze holds the environment: retry
    "invalid_input": 400,
    "store_error": 500,
    "store_unavailable": 503,  # the database is unreachable or restarting: retry shortly
    "snapshot_error": 500,
    # The request is well formed but contradicts the environment's state (an empty draft).
    "nothing_to_freeze": 409,
    # A stored blob's bytes changed under us: the server's state is damaged, not the request,
    # and retrying will not help. 500, with the detail naming the blob, its path and its hash.
    "corrupt_blob": 500,
    "blob_missing": 500,  # a stored snapshot names a blob that is gone: damage, as above
    "import_failed": 400,  # the oci:/oci-archive: source the client named is unreadable
    "disk_full": 507,  # Insufficient Storage; nothing stored was changed
    "draft_full": 507,  # the environment's draft is at its limit: freeze or discard it first
    "sandbox_error": 500,
    "requirement_missing": 503,  # this host cannot run sandboxes until an operator fixes it
    "sandbox_capacity": 503,  # every sandbox address is taken: retry later
    "sandbox_died": 503,  # killed before its command started: an infrastructure failure, retry
    "runc_error": 500,
    "network_error": 500,
    "command_not_found": 422,  # the argv is well formed but names nothing in the sandbox
    # The vault: a key problem is the server's to fix, never the client's, so 500.
    "vault_error": 500,
    "master_key_error": 500,
    "unknown_master_key": 500,
    "credential_tampered": 500,  # the stored bytes changed under us: damage or an attack
    "credential_not_found": 404,
    "credential_revoked": 410,  # Gone: it existed and was destroyed on purpose
    "master_key_in_use": 409,
    # The pipeline: apps, runs and their admission (corral/pipeline, corral/store).
    "app_not_found": 404,
    "run_not_found": 404,
    "release_not_found": 404,
    "app_exists": 409,
    "idempotency_mismatch": 409,  # the key was first used with another body: never retry as is
    "no_worker": 503,  # nothing would execute the run waited for: start a worker, then retry
    "agent_call_refused": 409,  # an agent call too deep, or a cycle: retrying cannot help
    # The app's concurrency policy refused the run for now (``reject``, or ``max_concurrent``
    # reached). 429, not 409: the request is fine and will be admitted once a run of the
    # user's ends, and clients and retry libraries treat 429 as "back off and retry", 409 as
    # final.
    "concurrency_limit": 429,
    # Content Too Large: the input is over corral.limits.MAX_INPUT; the same request will never
    # be admitted, and no run was recorded.
    "input_too_large": 413,
    "balance_limit": 409,  # a grant would lift the balance past the ledger's bound
    # Payment Required: the user's credits, or the app's budget, are spent.
    "budget_exhausted": 402,
    "lease_lost": 409,  # a worker's lease was taken over; never a client's doing in practice
    # Cron schedules (corral/triggers, corral/store).
    "invalid_cron": 400,  # the detail names the expression and what is wrong with it
    "invalid_time_zone": 400,  # not an IANA zone name
    "schedule_not_found": 404,
    # Errors of the run machinery; over HTTP they surface only inside a run's record, but each
    # keeps a status so that nothing reaching a handler is ever unmapped.
    "pipeline_error": 500,
    "bridge_error": 502,  # the bridge stands between a sandbox and the world: a gateway
    # The bridge's own answer to one call: ``status_for`` returns the status it carries, so
    # this row is only the class's, for a refusal that somehow carries none.
    "refused": 502,
    "token_refused": 401,  # a run token the bridge refused
    "refresh_failed": 502,  # the provider's token endpoint refused an OAuth refresh
    "bridge_unavailable": 503,
    "runner_invalid": 500,  # the current runner release does not work in this environment
    "runner_swap_failed": 500,
    "protocol_error": 502,  # a sandbox broke the event protocol
    "sandbox_ended": 503,  # the sandbox died: an infrastructure failure, retried
    "sandbox_timeout": 504,
    "delivery_not_found": 404,
    "delivery_failed": 502,  # an app owner's receiver did not take a webhook
    # Another host did not answer a request of Corral's: a gateway's failure, never the
    # client's. An unusable URL was stored by the client, but is only found out when used.
    "outbound_error": 502,
    "unusable_url": 502,
}


def status_for(exc: CorralError) -> int:
    """The HTTP status for ``exc``: its own row in ``STATUS``, else its nearest ancestor's."""
    if isinstance(exc, Refused):
        return exc.status
    for cls in type(exc).__mro__:
        code = cls.__dict__.get("code")
        if issubclass(cls, CorralError) and isinstance(code, str) and code in STATUS:
            return STATUS[code]
    return 500
