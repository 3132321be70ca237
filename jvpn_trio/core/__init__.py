"""The sans-IO core: pure, deterministic, no clocks, no sockets, no randomness.

Every entry point takes its inputs plus an injected ``now`` (float seconds on
the driver's monotonic clock) and returns decisions and events as data.
Randomness (session IDs, ephemeral keys) comes from an injected
``random_bytes(n) -> bytes`` callable.  ``tests/core/test_layering.py`` checks
that nothing in this package imports trio, socket, time, os, random, secrets,
logging or rich.
"""
