"""The HTTP toolbox: what every part of the agent uses to work on a twisted.web request,
without knowing the site, the routes or the endpoints (that is :mod:`portainer_agent.http`,
the edge).

Why a package of its own, and why this name: the upstreams (:mod:`portainer_agent.proxy`),
the console and the file browser all need the same few tools (header filters, Docker-style
error answers, request bodies as producers, sending a file, taking a connection over, the
private Twisted names), and they must never import the edge that routes requests to them.
"toolbox" says "tools, no policy", and its name shares no prefix with the edge's
(``http``), so an import of one is never mistaken for the other; ``web`` would read as
twisted.web's own site and resources, which is exactly what this package does not contain. It imports nothing from the agent but
:mod:`portainer_agent.errors` and :mod:`portainer_agent.fs.pool`.

* :mod:`.paths` — version prefixes, upgrade detection, hop-by-hop header filters;
* :mod:`.responses` — Docker-style JSON errors, empty and JSON answers, aborting a client;
* :mod:`.upload` — request bodies: streamed as they arrive (an ``IBodyProducer`` with
  backpressure), buffered, or read whole in bounded memory;
* :mod:`.whole_body` — a whole response body read, bounded and cancellable;
* :mod:`.bodysink` — a request body written to disk in the thread pool, with backpressure;
* :mod:`.filesend` — a file sent from the thread pool, byte ranges included;
* :mod:`.takeover` — a client connection taken over from twisted.web after an upgrade;
* :mod:`.teardown` — an upstream cancelled when the client leaves, a producer unregistered;
* :mod:`.twisted_private` — every private Twisted name the agent uses, each with why.
"""
