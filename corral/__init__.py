"""Corral: a self-hosted runtime for cloud agents.

Frozen environments (``snapshots``), isolated sandboxes (``sandbox``), and the store that
remembers both (``store``). See ARCHITECTURE.md for the map.
"""

__version__ = "0.1.0"
