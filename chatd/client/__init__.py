"""A trio client for chatd's wire protocol v1 (docs/protocol.md).

``open_client`` gives a reconnecting :class:`Client` with one method per command and
a gapless ``events()`` stream; ``open_connection`` is one bare WebSocket session.
"""

from chatd.client.client import Client, open_client
from chatd.client.connection import Connection, open_connection
from chatd.client.errors import ClientStopped, ConnectionLost, Disconnected, error_from_frame
from chatd.client.timeline import Timeline

__all__ = [
    "Client",
    "ClientStopped",
    "Connection",
    "ConnectionLost",
    "Disconnected",
    "Timeline",
    "error_from_frame",
    "open_client",
    "open_connection",
]
