"""Talking to the local Docker engine over its unix socket."""
