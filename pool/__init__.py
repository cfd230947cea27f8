"""The origin-connection pool: how upstream sockets get their source IP and port.

Layers, lowest first: ``pool.errors`` (the typed connect errors), ``pool.connectx`` (one
socket, kernel facts), ``pool.connectors`` (one attempt per egress mode),
``pool.egress_health`` (which egress IPs are on the host), ``pool.egress`` (which source IP
and port window), ``pool.upstream`` (one upstream connection), ``pool.origin``
(connections kept per origin).
"""

from pool.connectx import connectx, connectx_async

__version__ = "0.1.0"
__all__ = ["__version__", "connectx", "connectx_async"]
