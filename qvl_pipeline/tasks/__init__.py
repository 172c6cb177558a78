"""Tasks the CLI runs (task=...): each takes the plain config and the container, returns an exit code."""
