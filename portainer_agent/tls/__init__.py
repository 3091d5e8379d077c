"""TLS for the agent API: the self-signed certificate made at start, the server
context (TLS 1.2+, optional client-certificate CA), and the half-close shim that
hijacked Docker streams need over TLS."""
