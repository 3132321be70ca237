"""TUN offloads through real processes and real kernels: super-frames in, glued frames out, bytes intact.

A paced TCP stream runs from the client's namespace to the gateway's tunnel address.  Asserted
from each side's ``status`` counters: the client's TUN handed over TSO super-frames
(``tun.gso_frames_read``), the client's GSO bursts reached the gateway's socket as GRO buffers
(``udp.gro_buffers``), and the gateway wrote glued GSO frames (``tun.gso_frames_written``);
every byte arrived in order (SHA-256 of the stream); no packet was refused by the offload code.  With ``tun_offload = false`` none of those counters moves, and the stream is just as intact.
Counts, never timings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from jvpn_trio.lab.netns import Lab
from jvpn_trio.lab.processes import TunnelOptions
from tests.integration.tunnel_lab import GATEWAY_TUNNEL, start_tunnel
from tests.netns import lab, requires_lab, start_server  # noqa: F401  (lab is a fixture)

STREAM_S = 3.0
RATE_MBIT = 200.0


def offload_counters(status: dict[str, Any]) -> dict[str, int]:
    counters = status.get("counters", {})
    return {k: v for k, v in counters.items() if k.startswith(("tun.", "udp."))}


async def stream(lab: Lab, tmp_path: Path, name: str, *, port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A paced TCP stream from the client namespace to the gateway's tunnel address; both reports."""
    sink = await start_server(lab, lab.gateway_ns, "tcp-sink", f"{GATEWAY_TUNNEL}:{port}", tmp_path=tmp_path, name=name)
    report = tmp_path / f"{name}-source.json"
    source = await lab.start_process(
        lab.client_ns,
        [sys.executable, "-m", "jvpn_trio.lab.traffic", "tcp-source", "--connect", f"{GATEWAY_TUNNEL}:{port}",
         "--rate-mbit", str(RATE_MBIT), "--duration", str(STREAM_S), "--report", str(report)],
        stderr_path=tmp_path / f"{name}-source.err",
    )  # fmt: skip
    await source.wait()
    received = await sink.finish()
    sent = json.loads(report.read_text())
    return sent, received


@requires_lab
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
async def test_a_tcp_stream_crosses_as_super_frames_and_arrives_intact(lab: Lab, tmp_path: Path, offload: bool) -> None:
    with trio.fail_after(90):
        tunnel = await start_tunnel(lab, tmp_path, policy={}, options=TunnelOptions(tun_offload=offload))
        await tunnel.wait_attached()
        sent, received = await stream(lab, tmp_path, "up", port=5101)
        assert not sent["reset"] and sent["error"] is None, sent
        assert not received["reset"] and received["error"] is None, received
        assert received["bytes"] == sent["bytes"] > 0
        assert received["sha256"] == sent["sha256"]
        client = offload_counters(await tunnel.client_status())
        gateway = offload_counters(await tunnel.gateway_status())
        refused = {k: v for side in (client, gateway) for k, v in side.items() if "offload_refused" in k}
        assert refused == {}
        if offload:
            assert client.get("tun.gso_frames_read", 0) > 0, client  # the laptop's kernel handed over TSO frames
            assert client.get("tun.segments_read", 0) > client.get("tun.packets_read", 0), client
            # One receive per GSO burst at the gateway, split back into the datagrams the client sealed.
            assert gateway.get("udp.gro_buffers", 0) > 0, gateway
            assert gateway.get("udp.gro_segments", 0) > gateway["udp.gro_buffers"], gateway
            assert gateway.get("udp.datagrams_in", 0) >= gateway["udp.gro_segments"], gateway
            assert gateway.get("tun.gso_frames_written", 0) > 0, gateway  # and the gateway glued them back
        else:
            assert client.get("tun.gso_frames_read", 0) == 0 and gateway.get("tun.gso_frames_written", 0) == 0
            assert client.get("tun.segments_read", 0) == 0
        await tunnel.stop()
