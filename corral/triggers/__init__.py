"""Triggers: the routes into ``Pipeline.execute_agent`` other than a direct call.

``cron`` is the pure schedule maths (which instants an expression names in a time zone);
``schedules`` is what a schedule may be and when it fires next (the store,
``corral.store.schedules``, only keeps schedules and claims their ticks); ``scheduler`` is the
loop that fires due schedules as runs with trigger kind ``schedule``, and decides what a
missed fire time becomes. Nothing here admits, executes or bills a run: every run a trigger
starts goes through ``execute_agent`` like any other.
"""
