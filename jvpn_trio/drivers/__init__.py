"""Thin Trio drivers around the pure core: sockets, TUN, netlink, stores, timers, UI."""
