"""Triggers: the routes into ``Pipeline.execute_agent`` other than a direct call.

``cron`` is the pure schedule maths (which instants an expression names in a time zone);
``scheduler`` is the loop that fires due schedules as runs with trigger kind ``schedule``.
Their records live in the store (``corral.store.schedules``). Nothing here admits, executes
or bills a run: every run a trigger starts goes through ``execute_agent`` like any other.
"""
