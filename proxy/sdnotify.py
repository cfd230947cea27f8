"""systemd's service notification protocol (sd_notify(3)): readiness and stopping.

With ``Type=notify`` systemd considers the unit started when the proxy says ``READY=1``, which
it does once every worker's listeners accept, and shows "deactivating" from ``STOPPING=1``
(the drain). Units ordered after originpool then start against a proxy that accepts, without
polling the admin listener.

The protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (``@`` for the abstract namespace); systemd documents it as stable and
meant to be spoken directly. Hand-written rather than the ``sdnotify`` package (last release
2017) or libsystemd bindings (a C build dependency) for those dozen lines.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when not run by systemd with
    ``Type=notify`` (no ``$NOTIFY_SOCKET``) or when the socket refuses it. Never raises:
    a notification lost must not stop the proxy."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
