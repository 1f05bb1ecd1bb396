"""Who is calling the API: ``Caller``, the principal a route acts for.

Every route that acts for someone takes a ``Caller`` and passes it to the services, which
scope what they read and write to it (``Principal.scope``).

Until API keys exist (issue 10), the caller is whoever ``X-Corral-User`` names, as a plain
user; with no header, the local operator. This module is the one place that changes when the
header gives way to keys.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header

from corral.api import models
from corral.identity import LOCAL_OPERATOR, Principal
from corral.store.rows import USER_RULE, check_user


def caller(
    x_corral_user: Annotated[
        str | None,
        Header(
            description="the calling user (no authentication yet); default `local`. " + USER_RULE,
            json_schema_extra=models.header(models.USER),
        ),
    ] = None,
) -> Principal:
    if x_corral_user is None or x_corral_user == LOCAL_OPERATOR.user:
        return LOCAL_OPERATOR
    return Principal(check_user(x_corral_user))


Caller = Annotated[Principal, Depends(caller)]
