"""Same key twice over the in-memory network: the gateway's SESSION_REPLACED, its CLOSE, the agent's hold.

Determinism rules: virtual time only (autojump_clock), an in-memory network,
seeded randomness; every wait is bounded by fail_after in virtual seconds.
The gateway tests script their clients (raw handshakes and sealed frames, as
tests/drivers/test_gateway_runtime.py does); the agent tests run two real
ClientAgents holding one key against one gateway.
"""

from __future__ import annotations

import random

import pytest
import trio

from jvpn_trio.core import wire
from jvpn_trio.core.actions import EmitEvent, EventKind
from jvpn_trio.core.agent import HOLD_PEER_REASONS
from jvpn_trio.core.channel import ChannelDrop
from jvpn_trio.core.ids import PathId, SessionId
from jvpn_trio.core.noise import generate_static
from jvpn_trio.core.states import ReasonCode, SessionState
from jvpn_trio.drivers.agent import ClientAgent
from jvpn_trio.drivers.client import RuntimeStatus
from jvpn_trio.drivers.memory import MemoryPacketPort
from jvpn_trio.drivers.ports import Address
from jvpn_trio.ui.status import HELD_STATES, client_status, render_status_text
from jvpn_trio.ui.views import STATE_STYLES, attached_view_model
from tests.drivers.test_agent import WALL_EPOCH_NS, AgentWorld, handshake_inits, running, session_of
from tests.drivers.test_gateway_runtime import GATEWAY_CONTROL, Peer, World
from tests.drivers.test_runtime_memory import GATEWAY, client_path, tap

R = ReasonCode
LAPTOP_2 = ("198.51.100.22", 40022)
ATTACKER = ("203.0.113.66", 6666)
#: A peer number whose address no scripted client uses (World has peers 1..4).
SPARE = 4
#: How far the second machine's wall clock is from the first's (handshake timestamps differ).
OTHER_CLOCK_NS = 7 * 1_000_000_000


class ReplaceWorld(World):
    """The gateway of test_gateway_runtime with its event log kept."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[EmitEvent] = []
        self.gateway._emit = self.events.append

    def ended(self) -> list[tuple[str, ReasonCode]]:
        return [
            (e.session, e.reason)
            for e in self.events
            if e.kind is EventKind.STATE_CHANGE and e.detail("to_state") == SessionState.TERMINATED.value
        ]


def laptop(world: World, number: int, addr: Address | None = None) -> Peer:
    """A scripted client holding peer ``number``'s key, at ``addr`` (default: the peer's own address)."""
    if addr is None:
        return Peer(world, number)
    peer = Peer(world, SPARE)  # its port at the spare peer's address is left unused: no one else's is taken over
    peer.static = world.statics[number]
    peer.port = world.net.port(addr)
    peer.wall_time_ns += OTHER_CLOCK_NS  # another machine: its own clock
    return peer


async def attach(peer: Peer, seq: int = 1) -> SessionId:
    """Handshake, then confirm the session with a probe so that the gateway binds it."""
    result = await peer.handshake()
    assert result is not None
    peer.send(wire.MessageType.PROBE, wire.encode_probe_plaintext(wire.Probe(path_id=PathId(1), seq=seq, sent_us=1)))
    await trio.sleep(0.1)
    return result.session_id


async def received(peer: Peer) -> list[bytes]:
    """Every datagram waiting at ``peer``'s port."""
    out: list[bytes] = []
    with trio.move_on_after(0.1):
        while True:
            out += [data for data, _ in await peer.port.recv_batch(64)]
    return out


def closes(peer: Peer, datagrams: list[bytes]) -> list[wire.Close]:
    """The CLOSEs among ``datagrams`` that ``peer``'s keys open."""
    out = []
    for data in datagrams:
        if wire.peek_type_untrusted(data) is not wire.MessageType.CLOSE:
            continue
        opened = peer.channel.open_untrusted(data, now=trio.current_time())
        message = wire.decode_plaintext_untrusted(opened.msg_type, opened.plaintext)
        assert isinstance(message, wire.Close)
        out.append(message)
    return out


# -- the gateway --------------------------------------------------------------------------------


async def test_the_displaced_client_gets_an_authenticated_close_and_the_gateway_logs_session_replaced(
    autojump_clock: trio.abc.Clock,
) -> None:
    world = ReplaceWorld()
    first, second = laptop(world, 1), laptop(world, 1, LAPTOP_2)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            old = await attach(first)
            (served,) = world.gateway.sessions.values()
            assert served.core.record.binding is not None
            await received(first)  # its PROBE_ACK
            new = await attach(second)
            assert list(world.gateway.sessions) == [new]
            assert world.gateway.sessions[new].address == served.address  # the key's address passes on
            # The old laptop's keys open the CLOSE: it was sealed with the old session's keys.
            assert closes(first, await received(first)) == [wire.Close(session_id=old, reason=R.SESSION_REPLACED)]
            assert world.ended() == [(old.hex, R.SESSION_REPLACED)]
            stats = world.gateway.statistics()
            assert (stats.terminated_session_replaced, stats.terminated_peer_close) == (1, 0)
            nursery.cancel_scope.cancel()


async def test_nobody_without_the_key_can_displace_a_session(autojump_clock: trio.abc.Clock) -> None:
    """An unknown key, another authorised key and a replayed init of the holder's change nothing."""
    world = ReplaceWorld()
    alice = laptop(world, 1)
    inits = tap(world.net, wire.MessageType.HANDSHAKE_INIT, lambda data, _src, _dst: data)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            session = await attach(alice)
            await received(alice)
            # A stranger: a key the gateway does not know.
            stranger = laptop(world, 2, ATTACKER)
            rng = random.Random(99)
            stranger.static = generate_static(lambda n: bytes(rng.getrandbits(8) for _ in range(n)))
            assert await stranger.handshake() is None
            # Another authorised peer: its own session, Alice's untouched.
            bob = laptop(world, 2)
            assert await bob.handshake() is not None
            # Alice's own init, captured and sent again from the attacker's address (and from hers).
            for source in (ATTACKER, alice.port.addr):
                world.net.deliver(inits[0], source, GATEWAY_CONTROL)
            await trio.sleep(0.5)
            stats = world.gateway.statistics()
            assert (stats.handshake_unknown_peer, stats.handshake_handshake_replay) == (1, 2)
            assert session in world.gateway.sessions and len(world.gateway.sessions) == 2
            assert world.gateway.sessions[session].core.record.state is SessionState.ATTACHED
            assert stats.terminated_session_replaced == 0 and world.ended() == []
            assert closes(alice, await received(alice)) == []  # nothing was sent to her
            nursery.cancel_scope.cancel()


async def test_a_replayed_close_does_nothing(autojump_clock: trio.abc.Clock) -> None:
    world = ReplaceWorld()
    first, second = laptop(world, 1), laptop(world, 1, LAPTOP_2)
    captured = tap(world.net, wire.MessageType.CLOSE, lambda data, _src, dst: (data, dst))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await world.start(nursery)
            await attach(first)
            await received(first)
            new = await attach(second)
            (close, to), = captured
            assert to == first.port.addr
            assert [c.reason for c in closes(first, await received(first))] == [R.SESSION_REPLACED]
            before = world.gateway.statistics()
            # Again to the displaced laptop: its replay window refuses the second delivery.
            try:
                first.channel.open_untrusted(close, now=trio.current_time())
            except ChannelDrop as drop:
                assert drop.reason is R.REPLAYED_COUNTER
            else:
                raise AssertionError("a replayed CLOSE opened")
            # To the new laptop: not its keys.
            try:
                second.channel.open_untrusted(close, now=trio.current_time())
            except ChannelDrop:
                pass
            else:
                raise AssertionError("the old session's CLOSE opened with the new session's keys")
            # To the gateway, from anywhere: nothing of its own to open, no session touched.
            for source in (ATTACKER, first.port.addr, second.port.addr):
                world.net.deliver(close, source, GATEWAY_CONTROL)
            await trio.sleep(0.5)
            after = world.gateway.statistics()
            assert after.drop_unknown_index == before.drop_unknown_index + 3
            assert list(world.gateway.sessions) == [new] and world.ended() == [(world.ended()[0][0], R.SESSION_REPLACED)]
            assert world.gateway.sessions[new].core.record.state is SessionState.ATTACHED
            nursery.cancel_scope.cancel()


# -- the agent ----------------------------------------------------------------------------------


class TwoLaptops(AgentWorld):
    """AgentWorld's laptop, and a second one holding the same key elsewhere (one path)."""

    def __init__(self) -> None:
        super().__init__()
        self.second_events: list[EmitEvent] = []
        self.second_logs: list[str] = []
        self.second_port = self.net.port(LAPTOP_2)
        self.second = ClientAgent(
            policy=self.policy,
            static=self.cl_static,  # the same key
            gateway_public=self.gw_static.public,
            paths=[client_path(1, self.second_port)],
            emit=self.second_events.append,
            packets=MemoryPacketPort(),
            random_bytes=self.random_bytes,
            wall_time_ns=lambda: WALL_EPOCH_NS + OTHER_CLOCK_NS + int(trio.current_time() * 1e9),
            log=self.second_logs.append,
        )

    async def start_second(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.second.serve)


async def attached(agent: ClientAgent, sessions_started: int) -> SessionId:
    def ready(status: RuntimeStatus | None) -> bool:
        return (
            status is not None
            and status.sessions_started == sessions_started
            and status.snapshot is not None
            and status.snapshot.record.state is SessionState.ATTACHED
        )

    status = await agent.status.wait_value(ready)
    assert status is not None
    return session_of(status)


def peer_end(events: list[EmitEvent], session: SessionId) -> tuple[ReasonCode, object]:
    end = [e for e in events if e.kind is EventKind.STATE_CHANGE and e.session == session.hex][-1]
    assert end.detail("to_state") == SessionState.TERMINATED.value
    return end.reason, end.detail("peer_reason")


def replaced_status(agent: ClientAgent) -> dict[str, object]:
    status = agent.status.value
    assert status is not None and status.snapshot is None
    return client_status(None, statistics=status.statistics, sessions_started=status.sessions_started, held=agent.held_reason)


async def test_the_displaced_agent_says_so_and_holds_instead_of_taking_the_session_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    world = TwoLaptops()
    policy = world.policy
    inits = handshake_inits(world)
    async with running(world, within=300) as nursery:
        first = await attached(world.agent, 1)
        await world.start_second(nursery)
        second = await attached(world.second, 1)
        await world.agent.status.wait_value(lambda s: s is not None and s.snapshot is None)
        # The older laptop: ended by the gateway's CLOSE, which said why; held, and its status says so.
        assert peer_end(world.client_events, first) == (R.PEER_CLOSE, "SESSION_REPLACED")
        assert world.agent.held and world.agent.held_reason is R.SESSION_REPLACED
        assert any(HOLD_PEER_REASONS[R.SESSION_REPLACED] in line for line in world.logs)
        status = replaced_status(world.agent)
        assert (status["state"], status["held"]) == (HELD_STATES[R.SESSION_REPLACED], "SESSION_REPLACED")
        assert status["held_because"] == "replaced by another client with the same key"
        assert "replaced by another client with the same key (SESSION_REPLACED)" in render_status_text(status)
        view = attached_view_model(status, [], now=0.0, received_at=0.0, origin=0.0, gateway="gw")
        assert view.state == "REPLACED" and view.state in STATE_STYLES and "c reconnects" in view.message
        # The gateway: the old session ended SESSION_REPLACED, not PEER_CLOSE; one session for the key.
        gateway = world.gateway
        assert gateway is not None
        ends = [(e.session, e.reason) for e in world.gateway_events if e.detail("to_state") == "TERMINATED"]
        assert ends == [(first.hex, R.SESSION_REPLACED)]
        assert list(gateway.sessions) == [second]
        # No flapping: however long it waits, the held laptop sends no handshake and the other keeps its session.
        sent = len(inits)
        await trio.sleep(policy.reconnect_max_ms / 1000.0 * 5)
        assert inits[sent:] == []
        assert world.agent.sessions_started == 1 and world.second.sessions_started == 1
        assert list(gateway.sessions) == [second] and gateway.statistics().terminated_session_replaced == 1
        # A person takes the session back: now the other laptop is the one replaced, and it holds.
        world.agent.reconnect_nowait("uid 1000")
        third = await attached(world.agent, 2)
        await world.second.status.wait_value(lambda s: s is not None and s.snapshot is None)
        assert peer_end(world.second_events, second) == (R.PEER_CLOSE, "SESSION_REPLACED")
        assert world.second.held_reason is R.SESSION_REPLACED and not world.agent.held
        await trio.sleep(policy.reconnect_max_ms / 1000.0 * 5)
        assert list(gateway.sessions) == [third] and gateway.statistics().terminated_session_replaced == 2
        assert (world.agent.sessions_started, world.second.sessions_started) == (2, 1)
        world.second.close_nowait()


@pytest.mark.parametrize("answer_lost", [False, True])
async def test_the_agents_own_rescue_replaces_its_session_without_holding(
    autojump_clock: trio.abc.Clock, answer_lost: bool
) -> None:
    """The gateway closes the session a rescue replaces too: the agent never holds for its own rescue.

    The gateway's answers stop reaching the laptop (it still hears the laptop, so it keeps a binding)
    until the laptop's rescue handshake leaves; then the rescue's answer and the CLOSE(SESSION_REPLACED)
    for the old session both arrive.  With ``answer_lost`` the answer never does: the CLOSE ends the
    old session while the rescue is still out, and the agent handshakes afresh instead of holding.
    """
    world = AgentWorld()
    dark = False
    lose_answer = False  # armed with the dark: the first answer after it is lost
    original = world.net.deliver

    def deliver(data: bytes, src: Address, dst: Address) -> None:
        nonlocal dark, lose_answer
        msg_type = wire.peek_type_untrusted(data)
        if dark and msg_type is wire.MessageType.HANDSHAKE_INIT:
            dark = False  # the rescue: from here on the laptop hears the gateway again
        if dark and src in (GATEWAY, GATEWAY_CONTROL):
            return
        if lose_answer and msg_type is wire.MessageType.HANDSHAKE_RESP:
            lose_answer = False
            return
        original(data, src, dst)

    world.net.deliver = deliver  # type: ignore[method-assign]
    closes_sent = tap(world.net, wire.MessageType.CLOSE, lambda _data, src, _dst: src)
    async with running(world, within=300):
        first = await attached(world.agent, 1)
        gateway = world.gateway
        assert gateway is not None
        dark, lose_answer = True, answer_lost
        second = await attached(world.agent, 2)
        assert second != first and not world.agent.held and world.agent.held_reason is None
        assert world.agent.statistics().rescues == (0 if answer_lost else 1)
        assert list(gateway.sessions) == [second]
        ends = [(e.session, e.reason) for e in world.gateway_events if e.detail("to_state") == "TERMINATED"]
        assert ends[0] == (first.hex, R.SESSION_REPLACED) and {reason for _, reason in ends} == {R.SESSION_REPLACED}
        assert closes_sent and set(closes_sent) <= {GATEWAY, GATEWAY_CONTROL}
        if answer_lost:
            assert peer_end(world.client_events, first) == (R.PEER_CLOSE, "SESSION_REPLACED")
        await trio.sleep(world.policy.reconnect_max_ms / 1000.0 * 3)
        assert world.agent.sessions_started == 2 and list(gateway.sessions) == [second]
