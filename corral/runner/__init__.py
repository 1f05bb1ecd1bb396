"""The runner: Corral's own code inside the sandbox.

It starts the user's agent, gives it a small SDK (``sdk.py``) and reports what happens as
structured events on a channel handed to it by the sandbox bootstrap. It ships on its own
clock: a release is copied into each environment's snapshot at ``/opt/corral/runner`` and
hot-swapped there when Corral publishes a new one (see ``corral/releases``).

Rules that keep it portable and safe:

* It imports nothing from the rest of Corral and only the standard library, and it runs on
  any Python from ``REQUIRES_PYTHON`` on: whatever interpreter the user's environment has.
* Inside a sandbox it is the package ``corral_runner``; every import within it is relative.
* Its run spec (entrypoint, input, bridge address, run token) arrives on a descriptor, never
  in environment variables that user code would inherit.
* Everything it reports (logs, progress, metrics, the result) leaves through the bridge, with
  the run token: the sandbox has no other way out.
"""

__version__ = "1.1.0"
REQUIRES_PYTHON = (3, 8)
