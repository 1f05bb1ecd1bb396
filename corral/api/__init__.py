"""The HTTP API (``corral serve``): ``app`` wires it, ``routes`` maps each route to one call
of the ``Environments`` service, ``models`` holds the request and response bodies (the
OpenAPI schemas), and ``errors`` owns the one table from ``CorralError`` to HTTP status."""
