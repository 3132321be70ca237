"""Running real gateway and client processes in a lab: configs, start-up, status, event logs.

The helpers live in the product now (``jvpn_trio.lab.processes``, shared with ``jvpn-trio lab``); this
module keeps the names the namespace tests import.
"""

from __future__ import annotations

from jvpn_trio.lab.processes import (
    CLIENT_TUNNEL,
    GATEWAY_TUNNEL,
    PORT,
    STATUS_POLL_S,
    Tunnel,
    TunnelError,
    start_tunnel,
    write_configs,
)

__all__ = [
    "CLIENT_TUNNEL",
    "GATEWAY_TUNNEL",
    "PORT",
    "STATUS_POLL_S",
    "Tunnel",
    "TunnelError",
    "start_tunnel",
    "write_configs",
]
