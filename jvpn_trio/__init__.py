"""jvpn-trio: a VPN whose session outlives any one transport.

The session (stable SessionID, keys, policy, versioned state) is the anchor;
Wi-Fi, LTE and Ethernet bindings come and go underneath it.  Decisions are
made by the pure core in :mod:`jvpn_trio.core`; Trio drivers only move bytes.
"""

__version__ = "0.1.0"
