"""Local fakes of the upstream services the bridge talks to, speaking their real protocols.

Each fake is a stdlib HTTP/1.1 server (``FakeService``) on 127.0.0.1 and a free port that
records every request and demands a credential, so a test can check that the user's real
credential - and not the sandbox's run token - reached the service. See ``base`` for the
shared machinery and the fault options (delay, reset, canned answers).
"""

from tests.fakes.anthropic_api import FakeAnthropic
from tests.fakes.base import Abort, FakeService, Headers, RecordedRequest, RequestLog, Response
from tests.fakes.github import FakeGitHub
from tests.fakes.market_data import FakeMarketData
from tests.fakes.oauth import FakeOAuthAPI
from tests.fakes.openai_api import FakeOpenAI
from tests.fakes.slack import FakeSlack
from tests.fakes.slow import FakeSlowUpstream, pattern_bytes

__all__ = [
    "Abort",
    "FakeAnthropic",
    "FakeGitHub",
    "FakeMarketData",
    "FakeOAuthAPI",
    "FakeOpenAI",
    "FakeService",
    "FakeSlack",
    "FakeSlowUpstream",
    "Headers",
    "RecordedRequest",
    "RequestLog",
    "Response",
    "pattern_bytes",
]
