"""Takeover end to end: gateway A is SIGKILLed, the client's session goes on at B with the same SessionID (root).

docs/cluster.md: when a gateway dies, its lease expires in etcd and another gateway of the
cluster takes the session over, keeping the SessionID and (the peer has a configured
``address``) the tunnel address; the new owner then announces that address on its LAN by
proxy ARP (``[cluster] announce_interface``), so return traffic follows the owner.

The lab (``jvpn_trio.lab.cluster``): a client on a WAN bridge with gateways A and B; both
gateways and a service host on a LAN bridge; one etcd member on the service host; routed
(``nat = false``) so that the service sees the client's tunnel address.  The service host
has the tunnel subnet on-link, so it reaches 10.66.0.2 only through whichever gateway
answers its ARP: the test adds no neighbour entry anywhere, the gateway must.

1. Start etcd, ``serve`` in A and B, ``up`` in the client (``[client] cluster = true``, A then
   B as ``[[gateway]]`` entries, a full tunnel with the kill switch); the client attaches at A.
2. A TCP stream (a counter every 10 ms, each echo checked in order) runs from the client to
   the service's echo server through the tunnel; etcd says A (``gw-a``) owns the session.
3. SIGKILL A.  The client's status shows B with the same SessionID and tunnel address;
   etcd says ``gw-b`` owns the key; B's events name the session; the client never had
   another SessionID.
4. The stream is still the one connection (one accept at the server, no reset), its echoes
   stayed in order and it made progress after the takeover.  Its longest stall is printed.

Determinism rules (tests/netns.py): every wait is bounded and polls a real condition
(status, the stream's progress file, etcd); no duration is asserted beyond bounds that only
catch hangs.  Every process and namespace is removed on any exit (the lab's teardown).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from jvpn_trio.config import load_client_config, load_gateway_config
from jvpn_trio.lab.cluster import (
    GATEWAY_A,
    GATEWAY_B,
    ClusterLab,
    ClusterSpec,
    Stream,
    StreamProgress,
    open_cluster_lab,
    write_cluster_configs,
)
from jvpn_trio.lab.etcd import etcd_binary
from jvpn_trio.lab.processes import CLIENT_TUNNEL, PORT, STATUS_POLL_S
from tests.netns import requires_lab, unique_prefix

requires_etcd = pytest.mark.skipif(
    etcd_binary() is None, reason="needs the etcd binary (apt-get install etcd-server)"
)

#: Bound on the whole test: the lab, etcd, three processes, the takeover and every wait.
TEST_BOUND_S = 180.0
#: From ``up`` to a session attached at A (one handshake; generous for a loaded machine).
ATTACH_BOUND_S = 30.0
#: Echoes the stream must have got back before A is killed (one second at 10 ms), and after
#: the takeover, to count as flowing.
ECHOES_BEFORE_KILL = 100
ECHOES_AFTER_TAKEOVER = 100
#: Waits for the stream to flow (TCP's retransmission back-off after a stall can reach tens of
#: seconds: this only catches a hang).
FLOW_BOUND_S = 60.0
#: From A's death to the client attached at B: the lease TTL (3 s), detection, the takeover.
TAKEOVER_BOUND_S = 60.0
#: Bound on an event reaching its log file.
EVENTS_BOUND_S = 10.0
#: Bound on the stream's last progress record once asked to stop.
STOP_BOUND_S = 10.0


async def wait_stream(stream: Stream, echoed: int, *, after: float = 0.0) -> StreamProgress:
    """Poll the stream's progress until ``echoed`` echoes came back, the last one after ``after``.

    ``after`` is a ``time.monotonic()`` reading (the tool's clock too); fails at once if the stream broke.
    """
    while True:
        progress = await stream.progress()
        if progress is not None:
            assert progress.error is None, f"the TCP stream broke: {progress}"
            if progress.echoed >= echoed and (progress.last_echo_at or 0.0) > after:
                return progress
        if stream.process.returncode is not None:
            pytest.fail(f"tcp-stream exited {stream.process.returncode}: {progress} {stream.stderr.read_text()}")
        await trio.sleep(STATUS_POLL_S)


def client_sessions(lab: ClusterLab) -> set[str]:
    return {e.session for e in lab.events("client") if e.session}


@requires_lab
@requires_etcd
async def test_takeover_keeps_the_session_the_address_and_the_tcp_stream(tmp_path: Path) -> None:
    with trio.fail_after(TEST_BOUND_S):
        async with open_cluster_lab(ClusterSpec(prefix=unique_prefix()), tmp_path) as lab:
            await lab.start_all()
            with trio.fail_after(ATTACH_BOUND_S):
                first = await lab.wait_attached(GATEWAY_A)
            session, address = first["session"], first["tunnel_address"]
            assert address == f"{CLIENT_TUNNEL}/24"

            # Return traffic reaches the client only through the owner's proxy ARP (announce_interface).
            echo = await lab.start_echo_server()
            stream = await lab.start_stream()
            with trio.fail_after(FLOW_BOUND_S):
                await wait_stream(stream, ECHOES_BEFORE_KILL)
            owned = await lab.etcd_record(session)
            assert owned is not None and owned.record.owner == GATEWAY_A.node_id, owned

            assert await lab.kill_gateway(GATEWAY_A.name) == -9
            killed_at = time.monotonic()
            at_kill = await stream.progress()
            assert at_kill is not None
            with trio.fail_after(TAKEOVER_BOUND_S):
                second = await lab.wait_attached(GATEWAY_B)
            taken_at = time.monotonic()  # from here, an echo can only have come through B
            assert second["session"] == session, "the takeover must keep the SessionID"
            assert second["tunnel_address"] == address
            taken = await lab.etcd_record(session)
            assert taken is not None and taken.record.owner == GATEWAY_B.node_id, taken
            assert taken.record.revision > owned.record.revision
            with trio.fail_after(EVENTS_BOUND_S):  # the event sink writes in the background
                while session not in {e.session for e in lab.events(GATEWAY_B.name)}:
                    await trio.sleep(STATUS_POLL_S)
            assert client_sessions(lab) == {session}

            with trio.fail_after(FLOW_BOUND_S):
                await wait_stream(stream, at_kill.echoed + ECHOES_AFTER_TAKEOVER, after=taken_at)
            with trio.fail_after(STOP_BOUND_S):
                final = await stream.stop()
            assert final is not None and final.error is None and not final.reset, final
            assert final.local == at_kill.local  # one connection, from its first echo to its last
            assert await echo.connections() == 1
            assert client_sessions(lab) == {session}
            assert "Traceback" not in lab.stderr_path("client").read_text()
    print(
        f"takeover: attached at B {taken_at - killed_at:.3f} s after A's death;"
        f" longest stall of the TCP stream {final.longest_gap_s:.3f} s, {final.echoed} echoes in order"
    )



@pytest.mark.parametrize("store", ["etcd", "memory"])
def test_the_lab_configs_load(tmp_path: Path, store: str) -> None:
    """No root: the configs the lab writes pass the project's own loaders, as the brief above describes them."""
    write_cluster_configs(tmp_path, ClusterSpec(store=store))
    client = load_client_config(tmp_path / "client.toml")
    assert [g.endpoint for g in client.gateways] == [(g.wan_address, PORT) for g in (GATEWAY_A, GATEWAY_B)]
    assert client.kill_switch and client.cluster
    for gateway in (GATEWAY_A, GATEWAY_B):
        config = load_gateway_config(tmp_path / f"{gateway.name}.toml")
        assert config.node_id == gateway.node_id and not config.nat
        assert [str(p.address) for p in config.peers] == [CLIENT_TUNNEL]
        assert config.cluster.store == store and config.cluster.announce_interface == "lan0"
