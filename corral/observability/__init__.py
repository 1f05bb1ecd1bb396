"""Signals about runs: Prometheus metrics, OpenTelemetry traces, structured logs.

All three are derived from the same records (the run, its event log, the bridge's audit rows),
so they are identical in shape whoever triggered the run.
"""
