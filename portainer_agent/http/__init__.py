"""The agent's HTTP face: root resource, site, error rendering, streaming relay."""
