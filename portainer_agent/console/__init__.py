"""Portainer's container console: ``/websocket/exec`` and ``/websocket/attach``.

A browser's websocket on one side, Docker's hijacked exec or attach stream on the
other. ``text`` turns Docker's bytes into websocket text without cutting characters,
``session`` is the websocket end of the relay, ``docker_stream`` opens Docker's side;
the HTTP edge that checks the request and joins the two is
:mod:`portainer_agent.http.console`.
"""
