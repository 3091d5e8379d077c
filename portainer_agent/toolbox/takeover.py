"""Taking a client connection over from twisted.web (an upgrade answered ``101``).

Why here, in the toolbox: the hijack splice (:mod:`portainer_agent.proxy.splice`) and the
websocket console (:mod:`portainer_agent.http.console`) both carry on a request as a raw
byte stream, and must do it the same way: the bytes twisted.web already read past the
request head go to the new protocol, and the protocol is swapped at the transport (TLS
wrapper or TCP) so it also receives half-closes, which twisted.web's own websocket
upgrade does not pass on.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Protocol
from twisted.web.server import Request

from portainer_agent.toolbox.teardown import unregister_producer
from portainer_agent.toolbox.twisted_private import take_unread


def take_over_transport(request: Request, protocol: Protocol) -> Any:
    """Detach the client connection from twisted.web and hand it to ``protocol``.

    Replaces the protocol at the transport (TLS wrapper or TCP), so the new protocol
    also receives half-closes, which twisted.web's own websocket upgrade does not
    pass on. Returns the transport.
    """
    channel = request.channel
    # The concrete connection (TLS wrapper or TCP): its protocol attribute is swapped,
    # which no transport interface declares.
    transport: Any = channel.transport
    buffered = take_unread(channel)
    channel.setTimeout(None)
    unregister_producer(transport)
    if hasattr(transport, "wrappedProtocol"):
        transport.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    channel.transport = None
    protocol.makeConnection(transport)
    transport.resumeProducing()
    if buffered:
        protocol.dataReceived(buffered)
    return transport
