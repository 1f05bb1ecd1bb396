"""The API against its own OpenAPI document, property-based: schemathesis, every check.

uvicorn serves the real API over a Corral of its own (a temporary data directory, the real
base image, real sandboxes: ``exec`` and ``sandboxes`` boot them), and the ``schemathesis``
command generates requests from ``/openapi.json``, both valid and invalid, and checks every
answer: no 5xx, statuses and bodies as documented, schema-valid requests accepted and
schema-violating ones refused, ``Allow`` on 405 and ``OPTIONS``. The number of examples and
the seed are fixed, so a run is repeatable and takes well under a minute.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from corral.api.app import create_app
from corral.config import Settings
from corral.context import Corral
from tests.conftest import need_sandboxes, require
from tests.hosts import serving

pytestmark = [pytest.mark.root, pytest.mark.runc]

CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = 15
SEED = 20261202


def test_the_api_keeps_its_openapi_contract(tmp_path: Path) -> None:
    need_sandboxes()
    settings = Settings.from_env(
        {
            **os.environ,
            "CORRAL_DATA_DIR": str(tmp_path / "data"),
            "CORRAL_BRIDGE_PORT": str(8800 + secrets.randbelow(80)),
            "CORRAL_SANDBOX_TIMEOUT": "10",  # whatever command is generated, its sandbox ends soon
        }
    )
    if not settings.base_image.is_file():
        require("runc", f"the base image {settings.base_image}: run scripts/build-base-image.sh")
    corral = Corral(settings)
    try:
        with serving(create_app(corral)) as url:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "schemathesis.cli",
                    "--config-file",
                    str(CONFIG),
                    "run",
                    f"{url}/openapi.json",
                    "--checks",
                    "all",
                    "--workers",
                    "1",
                    "--max-examples",
                    str(EXAMPLES),
                    "--seed",
                    str(SEED),
                    "--no-color",
                    # a sandbox boots in well under a second, but not on a machine running
                    # several suites at once: slowness is not what this test is about
                    "--request-timeout",
                    "120",
                ],
                capture_output=True,
                text=True,
                timeout=600,
                cwd=tmp_path,  # its cache too
            )
    finally:
        corral.close()
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    counted = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert counted is not None and counted[1] == counted[2] and int(counted[1]) > 500, proc.stdout
