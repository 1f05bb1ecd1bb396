"""The execution pipeline: one path from a request to a finished, recorded agent run."""
