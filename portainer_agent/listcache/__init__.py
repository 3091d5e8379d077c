"""Cluster lists from memory: each agent keeps its own node's answers to the four list
requests, kept exact by Docker's event stream (see :mod:`.service`)."""
