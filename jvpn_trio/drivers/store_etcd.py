"""Session ownership in etcd v3, reached through etcd's JSON gateway with httpx (spec section 10).

Theory of operation
-------------------
Each session has one key, ``<prefix><session id hex>`` (default prefix ``/jvpn-trio/sessions/``),
whose value names the owning node and the *attempt id* of the write that put it there.  Every
change is one etcd transaction that compares the key's ``mod_revision`` with the revision the
caller holds; a new session compares ``create_revision == 0`` ("no key yet").  The key's
``mod_revision`` after a successful transaction is the record's ``revision``: the fencing epoch
(a later owner always has a higher one, because etcd's revisions only grow).  A losing
transaction reads the key in its failure branch, so a conflict returns the record that won.

Claims are attached to this node's lease: granted on :meth:`EtcdOwnershipStore.start`, kept
alive by a task in the caller's nursery, revoked on :meth:`EtcdOwnershipStore.aclose`.  When the
node dies or loses etcd, the lease expires and etcd deletes its records.  A lease alone does not
give mutual exclusion, so the store also publishes how long the lease is *certainly* alive: a
keepalive sent at ``t`` (local monotonic clock) and answered with TTL ``T`` proves it until
``t + T - margin`` (:func:`lease_valid_until`); past that instant the gateway must stop serving.

Fail closed.  Any non-200 reply, timeout, connection error or unparsable reply raises
:class:`StoreUnavailable`, never a partial answer.  A transaction that was sent but whose outcome
is unknown (timeout, 5xx, a broken reply) raises :class:`StoreAmbiguous` instead: the claim then
re-reads the key once and decides from the attempt id in the value (:func:`resolve_attempt`).
If the key still sits at the expected revision the transaction may yet land, so the outcome
stays unknown and :class:`StoreAmbiguous` reaches the caller, who denies (OWNERSHIP_AMBIGUOUS).
Reads are always linearizable (etcd's default): a serializable read on a member cut off from
its quorum answers at once with stale data.

The JSON shapes (etcd 3.4): keys and values are base64, 64-bit integers are strings, and zero
or false fields are omitted (a failed txn has no ``succeeded``; an absent key has no ``kvs``).
Everything that builds or reads a JSON body is a plain function below, tested without etcd;
:class:`EtcdClient` and :class:`EtcdOwnershipStore` only do I/O.

Tickets.  Beside the session keys, ``<prefix>peer/<fingerprint>`` holds each peer's
:class:`~jvpn_trio.core.ownership.SessionTicket` (its latest session, owner and tunnel
addresses), written in the same transaction as a new session's claim and *not* under a lease:
it outlives a dead owner, so that another gateway can take the session over
(:meth:`EtcdOwnershipStore.take_over`: one transaction comparing "no session key" and "ticket
unchanged").  There is at most one ticket per configured peer; a session that ends cleanly
deletes its own (:meth:`EtcdOwnershipStore.forget_ticket`).

Latency.  The store times each of its calls on its injected clock and hands ``(operation,
outcome, seconds)`` to an optional *observer* (:data:`StoreObserver`; the gateway's metrics,
docs/metrics.md): :class:`StoreOperation` names the call as the caller sees it (a claim's
re-read and a release's read are part of that claim or release), :class:`StoreOutcome` how it
ended.  A call its caller cancels has no outcome and is not observed.  The observer is called
synchronously and must be cheap and must not raise, like the event sink's ``also`` hook.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import ipaddress
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import attrs
import httpx
import trio

from jvpn_trio.core.ids import SessionId
# The store's errors live in the core, so that the gateway handles any store's alike; they are
# part of this module's API too.
from jvpn_trio.core.ownership import (
    ABSENT_REVISION,
    OwnershipRecord,
    SessionTicket,
    lease_renewable,
    lease_ttl_s,
)
from jvpn_trio.core.ownership import StoreAmbiguous as StoreAmbiguous
from jvpn_trio.core.ownership import StoreError as StoreError
from jvpn_trio.core.ownership import StoreUnavailable as StoreUnavailable
from jvpn_trio.drivers.store_memory import CasResult

#: Where session keys live; one key per session below it.
DEFAULT_PREFIX = "/jvpn-trio/sessions/"
#: Bytes of randomness in an attempt id (hex in the value).
ATTEMPT_ID_BYTES = 16
#: The format version written into every value; a value with another version is unparsable.
VALUE_FORMAT = 1
#: Below the prefix, where each live gateway's node key lives (session keys are hex: no slash).
NODE_KEY_DIR = "node/"
#: Below the prefix, where each peer's session ticket lives (no lease: it outlives its owner).
TICKET_KEY_DIR = "peer/"
#: The session id a node key's record is decoded with: node keys belong to no session.
_NO_SESSION = SessionId(bytes(16))

Json = dict[str, Any]
T = TypeVar("T")


class StoreOperation(enum.StrEnum):
    """A store call as its latency is recorded (the metrics' ``operation`` label)."""

    CLAIM = "claim"
    READ = "read"
    RELEASE = "release"
    GRANT = "grant"
    KEEPALIVE = "keepalive"
    REVOKE = "revoke"
    REGISTER_NODE = "register_node"
    TIME_TO_LIVE = "time_to_live"
    TAKE_OVER = "take_over"
    READ_TICKET = "read_ticket"
    FORGET_TICKET = "forget_ticket"


class StoreOutcome(enum.StrEnum):
    """How a store call ended (the metrics' ``outcome`` label)."""

    OK = "ok"
    #: etcd answered, and the compare did not hold: a claim or release lost, a node id in use.
    CONFLICT = "conflict"
    #: No answer, nothing changed (StoreUnavailable).
    UNAVAILABLE = "unavailable"
    #: A txn was sent and its outcome is unknown (StoreAmbiguous).
    AMBIGUOUS = "ambiguous"
    #: A keepalive answered without TTL: etcd no longer has our lease.
    LEASE_LOST = "lease_lost"


#: Called with (operation, outcome, seconds on the store's clock) once per finished store call.
StoreObserver = Callable[[str, str, float], None]


class NodeIdInUse(StoreError):
    """Another live gateway holds this ``node_id``'s node key: two gateways must never share one."""


def error_outcome(exc: StoreError) -> StoreOutcome:
    """The outcome a store error is recorded as."""
    if isinstance(exc, StoreAmbiguous):
        return StoreOutcome.AMBIGUOUS
    if isinstance(exc, NodeIdInUse):
        return StoreOutcome.CONFLICT
    return StoreOutcome.UNAVAILABLE


def cas_outcome(result: CasResult) -> StoreOutcome:
    """A claim or release that etcd answered: ours (ok), or the compare did not hold (conflict)."""
    return StoreOutcome.OK if result.succeeded else StoreOutcome.CONFLICT


class BadReply(ValueError):
    """A reply body that does not have the shape etcd documents (the one error of the decoders)."""


# --- pure: keys, values, requests -------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def session_key(prefix: str, session_id: SessionId) -> bytes:
    """The session's key: the prefix, then the session id in hex."""
    return (prefix + session_id.hex).encode()


def node_key(prefix: str, node_id: str) -> bytes:
    """The key that says a live gateway goes by ``node_id``; it lives under that gateway's lease."""
    return (prefix + NODE_KEY_DIR + node_id).encode()


def ticket_key(prefix: str, peer: str) -> bytes:
    """The key of ``peer``'s session ticket (``peer`` is its fingerprint, hex)."""
    return (prefix + TICKET_KEY_DIR + peer).encode()


def new_attempt_id() -> str:
    """A fresh attempt id: lets a retried claim recognise its own earlier write."""
    return secrets.token_hex(ATTEMPT_ID_BYTES)


@attrs.frozen
class StoredValue:
    """What a session key's value says: the owner, and which attempt wrote it."""

    owner: str
    attempt: str

    def to_bytes(self) -> bytes:
        return json.dumps({"v": VALUE_FORMAT, "owner": self.owner, "attempt": self.attempt}).encode()

    @classmethod
    def from_bytes_untrusted(cls, data: bytes) -> StoredValue:
        """Parse a stored value; raises :class:`BadReply` for anything we did not write."""
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise BadReply(f"value is not JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("v") != VALUE_FORMAT:
            raise BadReply("value is not a version-1 ownership record")
        owner, attempt = obj.get("owner"), obj.get("attempt")
        if not isinstance(owner, str) or not owner or not isinstance(attempt, str) or not attempt:
            raise BadReply("value lacks owner or attempt")
        return cls(owner=owner, attempt=attempt)


def encode_ticket(ticket: SessionTicket) -> bytes:
    """A ticket's value (its peer is in the key, its revision is the key's ``mod_revision``)."""
    obj: dict[str, Any] = {
        "v": VALUE_FORMAT,
        "session": ticket.session_id.hex,
        "owner": ticket.owner,
        "address": str(ticket.address),
    }
    if ticket.address6 is not None:
        obj["address6"] = str(ticket.address6)
    return json.dumps(obj).encode()


def decode_ticket_untrusted(data: bytes, *, peer: str, revision: int) -> SessionTicket:
    """Parse a ticket's value; raises :class:`BadReply` for anything we did not write."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadReply(f"ticket is not JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("v") != VALUE_FORMAT:
        raise BadReply("value is not a version-1 ticket")
    session, owner, address, address6 = obj.get("session"), obj.get("owner"), obj.get("address"), obj.get("address6")
    if not all(isinstance(x, str) and x for x in (session, owner, address)) or not isinstance(address6, str | None):
        raise BadReply("ticket lacks session, owner or address")
    assert isinstance(session, str) and isinstance(owner, str) and isinstance(address, str)
    try:
        return SessionTicket(
            peer=peer,
            session_id=SessionId.from_hex(session),
            owner=owner,
            address=ipaddress.IPv4Address(address),
            address6=None if address6 is None else ipaddress.IPv6Address(address6),
            revision=revision,
        )
    except ValueError as exc:
        raise BadReply(f"ticket does not parse: {exc}") from None


def range_request(key: bytes) -> Json:
    """A linearizable read of one key (never ``serializable``: see the module docstring)."""
    return {"key": b64(key)}


def claim_txn_request(key: bytes, *, expected_revision: int, value: bytes, lease_id: int) -> Json:
    """Put ``value`` under the lease iff the key is at ``expected_revision``; else read the key.

    ``ABSENT_REVISION`` means create-if-absent: compare ``create_revision == 0``.
    """
    if expected_revision == ABSENT_REVISION:
        compare = {"target": "CREATE", "key": b64(key), "result": "EQUAL", "create_revision": "0"}
    else:
        compare = {"target": "MOD", "key": b64(key), "result": "EQUAL", "mod_revision": str(expected_revision)}
    return {
        "compare": [compare],
        "success": [{"request_put": {"key": b64(key), "value": b64(value), "lease": str(lease_id)}}],
        "failure": [{"request_range": {"key": b64(key)}}],
    }


def with_ticket(body: Json, key: bytes, value: bytes) -> Json:
    """``body`` whose success branch also puts a ticket (no lease: it outlives the owner's)."""
    put = {"request_put": {"key": b64(key), "value": b64(value)}}
    return {**body, "success": [*body["success"], put]}


def takeover_txn_request(
    key: bytes, *, ticket_key_: bytes, ticket_revision: int, value: bytes, ticket_value: bytes, lease_id: int
) -> Json:
    """Own the session iff it has no key (its owner is gone) and the ticket is still at ``ticket_revision``."""
    return {
        "compare": [
            {"target": "CREATE", "key": b64(key), "result": "EQUAL", "create_revision": "0"},
            {"target": "MOD", "key": b64(ticket_key_), "result": "EQUAL", "mod_revision": str(ticket_revision)},
        ],
        "success": [
            {"request_put": {"key": b64(key), "value": b64(value), "lease": str(lease_id)}},
            {"request_put": {"key": b64(ticket_key_), "value": b64(ticket_value)}},
        ],
        "failure": [{"request_range": {"key": b64(key)}}],
    }


def release_txn_request(key: bytes, *, expected_revision: int) -> Json:
    """Delete the key iff it is at ``expected_revision``; else read it."""
    return {
        "compare": [{"target": "MOD", "key": b64(key), "result": "EQUAL", "mod_revision": str(expected_revision)}],
        "success": [{"request_delete_range": {"key": b64(key)}}],
        "failure": [{"request_range": {"key": b64(key)}}],
    }


def forget_ticket_txn_request(key: bytes, *, expected_revision: int) -> Json:
    """Delete a ticket iff it is still at ``expected_revision`` (no failure branch: nothing to learn)."""
    return {
        "compare": [{"target": "MOD", "key": b64(key), "result": "EQUAL", "mod_revision": str(expected_revision)}],
        "success": [{"request_delete_range": {"key": b64(key)}}],
    }


def grant_request(ttl_s: int) -> Json:
    return {"TTL": str(ttl_s)}


def lease_request(lease_id: int) -> Json:
    """The body of keepalive, revoke and timetolive: the lease id."""
    return {"ID": str(lease_id)}


def lease_valid_until(sent_at: float, ttl_s: float, margin_s: float) -> float:
    """Until when a lease is certainly alive: keepalive sent at ``sent_at`` answered with ``ttl_s``.

    etcd counts the TTL from when it handled the keepalive, which is after we sent it, so
    ``sent_at + ttl_s`` is a lower bound; ``margin_s`` covers the two clocks' drift.
    """
    return sent_at + ttl_s - margin_s


# --- pure: replies ----------------------------------------------------------------------------


def _int(obj: Json, field: str) -> int:
    """An int64 field: a decimal string (or a JSON number), 0 when omitted."""
    raw = obj.get(field, 0)
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise BadReply(f"{field} is not an integer")
    try:
        return int(raw)
    except ValueError as exc:
        raise BadReply(f"{field} is not an integer: {raw!r}") from exc


def _dict(obj: Any, what: str) -> Json:
    if not isinstance(obj, dict):
        raise BadReply(f"{what} is not an object")
    return obj


def _list(obj: Json, field: str) -> list[Any]:
    raw = obj.get(field, [])
    if not isinstance(raw, list):
        raise BadReply(f"{field} is not a list")
    return raw


def _bytes(obj: Json, field: str) -> bytes:
    raw = obj.get(field, "")
    if not isinstance(raw, str):
        raise BadReply(f"{field} is not base64 text")
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError as exc:  # binascii.Error, and non-ASCII text, which b64decode refuses with a plain ValueError
        raise BadReply(f"{field} is not base64: {exc}") from exc


@attrs.frozen(kw_only=True)
class EtcdRecord:
    """A session key as read: the ownership record (revision = mod_revision), its attempt and lease."""

    record: OwnershipRecord
    attempt: str
    lease_id: int


def decode_kv_untrusted(kv: Any, key: bytes, session_id: SessionId) -> EtcdRecord:
    """One ``kvs`` entry, checked to be the key we asked for."""
    kv = _dict(kv, "kv")
    if _bytes(kv, "key") != key:
        raise BadReply("reply is for another key")
    revision = _int(kv, "mod_revision")
    if revision <= ABSENT_REVISION:
        raise BadReply("kv without mod_revision")
    value = StoredValue.from_bytes_untrusted(_bytes(kv, "value"))
    return EtcdRecord(
        record=OwnershipRecord(session_id=session_id, owner=value.owner, revision=revision),
        attempt=value.attempt,
        lease_id=_int(kv, "lease"),
    )


def _only_kv(reply: Any) -> Any:
    """The one ``kvs`` entry of a range of one key, or None when the key is absent (no ``kvs``)."""
    kvs = _list(_dict(reply, "range reply"), "kvs")
    if len(kvs) > 1:
        raise BadReply("range of one key returned several")
    return kvs[0] if kvs else None


def decode_range_reply_untrusted(reply: Any, key: bytes, session_id: SessionId) -> EtcdRecord | None:
    """A range reply for one key: the record, or None when the key is absent (no ``kvs``)."""
    kv = _only_kv(reply)
    return None if kv is None else decode_kv_untrusted(kv, key, session_id)


@attrs.frozen(kw_only=True)
class TxnOutcome:
    """A txn reply: whether the compare held, the store revision after it, the failure branch's read."""

    succeeded: bool
    revision: int
    current: EtcdRecord | None


def decode_txn_reply_untrusted(reply: Any, key: bytes, session_id: SessionId) -> TxnOutcome:
    """A claim or release txn reply; a failed txn has no ``succeeded`` and carries its range."""
    reply = _dict(reply, "txn reply")
    succeeded = reply.get("succeeded", False)
    if not isinstance(succeeded, bool):
        raise BadReply("succeeded is not a boolean")
    revision = _int(_dict(reply.get("header"), "header"), "revision")
    responses = _list(reply, "responses")
    if not responses or (not succeeded and len(responses) != 1):
        raise BadReply("txn reply does not have the responses its branch sends")
    current = None
    if not succeeded:
        response = _dict(responses[0], "txn response")
        current = decode_range_reply_untrusted(response.get("response_range"), key, session_id)
    elif any("response_range" in _dict(response, "txn response") for response in responses):
        raise BadReply("a succeeded txn answered with its failure branch")
    return TxnOutcome(succeeded=succeeded, revision=revision, current=current)


def decode_ticket_range_untrusted(reply: Any, key: bytes, peer: str) -> SessionTicket | None:
    """A range reply for a ticket key: the ticket (revision = its ``mod_revision``), or None."""
    found = _only_kv(reply)
    if found is None:
        return None
    kv = _dict(found, "kv")
    if _bytes(kv, "key") != key:
        raise BadReply("reply is for another key")
    revision = _int(kv, "mod_revision")
    if revision <= ABSENT_REVISION:
        raise BadReply("kv without mod_revision")
    return decode_ticket_untrusted(_bytes(kv, "value"), peer=peer, revision=revision)


def decode_succeeded_untrusted(reply: Any) -> bool:
    """Whether a txn's compare held (a failed txn omits ``succeeded``)."""
    succeeded = _dict(reply, "txn reply").get("succeeded", False)
    if not isinstance(succeeded, bool):
        raise BadReply("succeeded is not a boolean")
    return succeeded


def claim_result(outcome: TxnOutcome, session_id: SessionId, node_id: str) -> CasResult:
    """What a claim txn means: our record at the txn's revision, or the record that beat us."""
    if outcome.succeeded:
        return CasResult(True, OwnershipRecord(session_id=session_id, owner=node_id, revision=outcome.revision))
    return CasResult(False, outcome.current.record if outcome.current else None)


def release_result(outcome: TxnOutcome) -> CasResult:
    if outcome.succeeded:
        return CasResult(True, None)
    return CasResult(False, outcome.current.record if outcome.current else None)


def may_release(current: EtcdRecord | None, node_id: str, expected_revision: int) -> bool:
    """Only the owner, at the revision it holds, may delete a record."""
    return current is not None and current.record.owner == node_id and current.record.revision == expected_revision


class Resolution(enum.Enum):
    WON = "WON"
    LOST = "LOST"
    UNKNOWN = "UNKNOWN"


def resolve_attempt(current: EtcdRecord | None, *, expected_revision: int, attempt: str) -> Resolution:
    """Decide an ambiguous claim from a linearizable re-read of the key.

    Our attempt id in the value: it landed.  The key has moved from where we expected it: our
    compare can no longer hold, so it did not land and never will.  Unchanged: it may still land.
    """
    if current is not None and current.attempt == attempt:
        return Resolution.WON
    current_revision = current.record.revision if current is not None else ABSENT_REVISION
    if current_revision != expected_revision:
        return Resolution.LOST
    return Resolution.UNKNOWN


@attrs.frozen
class GrantedLease:
    lease_id: int
    ttl_s: int


def decode_grant_reply_untrusted(reply: Any) -> GrantedLease:
    reply = _dict(reply, "grant reply")
    if reply.get("error"):
        raise BadReply(f"grant refused: {reply['error']}")
    lease_id, ttl_s = _int(reply, "ID"), _int(reply, "TTL")
    if lease_id == 0 or ttl_s <= 0:
        raise BadReply("grant reply without ID or TTL")
    return GrantedLease(lease_id, ttl_s)


def decode_keepalive_reply_untrusted(reply: Any, lease_id: int) -> int | None:
    """The TTL a keepalive renewed, or None when the lease is gone (etcd omits ``TTL`` then).

    The endpoint is a stream: its one reply is wrapped in ``result``, or is an ``error``.
    """
    reply = _dict(reply, "keepalive reply")
    if "error" in reply:
        raise BadReply(f"keepalive error: {reply['error']}")
    result = _dict(reply.get("result"), "keepalive result")
    if _int(result, "ID") != lease_id:
        raise BadReply("keepalive reply for another lease")
    ttl_s = _int(result, "TTL")
    return ttl_s if ttl_s > 0 else None


def decode_timetolive_reply_untrusted(reply: Any) -> int | None:
    """Seconds the lease has left, or None when it is gone (TTL -1)."""
    ttl_s = _int(_dict(reply, "timetolive reply"), "TTL")
    return ttl_s if ttl_s > 0 else None


def error_reason(status: int, body: bytes) -> str:
    """A short reason for a non-200 reply: etcd's ``message`` when the body has one."""
    message = ""
    with contextlib.suppress(ValueError):
        obj = json.loads(body)
        if isinstance(obj, dict) and isinstance(obj.get("message"), str):
            message = obj["message"]
    return f"HTTP {status}: {message}" if message else f"HTTP {status}"


def parse_json_untrusted(body: bytes) -> Any:
    """A reply body as JSON; a keepalive stream's first line when several came."""
    text = body.strip().split(b"\n", 1)[0]
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
        raise BadReply(f"reply is not JSON: {exc}") from None


# --- I/O: the client --------------------------------------------------------------------------


class EtcdClient:
    """POSTs JSON to etcd's ``/v3`` gateway, one endpoint at a time, each call bounded in time.

    A call that fails moves the client on to the next endpoint for the calls after it.  Reads
    and lease calls try each endpoint once; a txn moves on only when it was certainly not sent
    (the connection failed), since a txn sent to one member may still be applied.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        request_timeout_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport`` replaces the network (tests pass an ``httpx.MockTransport``)."""
        if not endpoints:
            raise ValueError("etcd client needs at least one endpoint")
        if not request_timeout_s > 0:
            raise ValueError(f"etcd request timeout must be positive, got {request_timeout_s}")
        self.endpoints = tuple(e.rstrip("/") for e in endpoints)
        self.request_timeout_s = request_timeout_s
        self._current = 0
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s), transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    def skip_endpoint(self) -> None:
        """Send the next calls to the next endpoint (after a reply that was well-formed but useless)."""
        self._current = (self._current + 1) % len(self.endpoints)

    async def _post_once(self, path: str, body: Json, *, txn: bool) -> Any:
        """One POST to the current endpoint; raises StoreUnavailable, or StoreAmbiguous for a sent txn."""
        url = self.endpoints[self._current] + path
        failure: type[StoreError] = StoreAmbiguous if txn else StoreUnavailable
        response = None
        with trio.move_on_after(self.request_timeout_s):
            try:
                response = await self._http.post(url, json=body)
            except httpx.ConnectError as exc:
                raise StoreUnavailable(f"{url}: cannot connect ({exc})") from exc
            except httpx.ConnectTimeout as exc:
                raise StoreUnavailable(f"{url}: connect timed out") from exc
            except httpx.TimeoutException as exc:
                raise failure(f"{url}: timed out") from exc
            except httpx.TransportError as exc:
                raise failure(f"{url}: {type(exc).__name__} {exc}") from exc
        if response is None:
            raise failure(f"{url}: no reply within {self.request_timeout_s}s")
        if response.status_code != httpx.codes.OK:
            # etcd answers 4xx only for requests it refused before applying anything.
            definite = httpx.codes.is_client_error(response.status_code)
            reason = error_reason(response.status_code, response.content)
            raise (StoreUnavailable if definite else failure)(f"{url}: {reason}")
        try:
            return parse_json_untrusted(response.content)
        except BadReply as exc:
            raise failure(f"{url}: {exc}") from exc

    async def post(self, path: str, body: Json, *, txn: bool = False) -> Any:
        """POST ``body`` to ``path``, moving on through the endpoints as the class docstring says."""
        errors: list[str] = []
        for _ in self.endpoints:
            try:
                return await self._post_once(path, body, txn=txn)
            except StoreAmbiguous:
                self.skip_endpoint()
                raise
            except StoreUnavailable as exc:
                self.skip_endpoint()
                errors.append(exc.reason)
        raise StoreUnavailable("; ".join(errors))


# --- I/O: the store ---------------------------------------------------------------------------


@attrs.frozen
class LeaseState:
    """This node's lease: its id, until when it is certainly alive, and whether etcd dropped it."""

    lease_id: int
    valid_until: float
    lost: bool = False

    def valid(self, now: float) -> bool:
        return not self.lost and now < self.valid_until


class EtcdOwnershipStore:
    """The ``OwnershipStore`` protocol on etcd: CAS on ``mod_revision``, claims under this node's lease.

    Beyond the protocol the gateway needs :meth:`start` (grant the lease, start the keepalive
    task), :attr:`lease` / :meth:`lease_valid` (serve a session only while it is true) and
    :meth:`aclose` (revoke).  :meth:`claim` raises :class:`StoreUnavailable` or
    :class:`StoreAmbiguous`; :meth:`read` and :meth:`release` raise :class:`StoreUnavailable`.

    ``observer`` (optional) hears every finished call's operation, outcome and duration on
    ``clock`` (see the module docstring).
    """

    def __init__(
        self,
        client: EtcdClient,
        *,
        lease_ttl_ms: int,
        lease_margin_s: float,
        keepalive_interval_s: float,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], float] = trio.current_time,
        attempt_ids: Callable[[], str] = new_attempt_id,
        observer: StoreObserver | None = None,
    ) -> None:
        ttl_s = lease_ttl_s(lease_ttl_ms)
        if lease_margin_s < 0:
            raise ValueError(f"lease margin must not be negative, got {lease_margin_s}")
        if not keepalive_interval_s > 0:
            raise ValueError(f"keepalive interval must be positive, got {keepalive_interval_s}")
        # A keepalive must be sent and answered before the last one's validity runs out.
        if not lease_renewable(
            ttl_s=ttl_s,
            keepalive_interval_s=keepalive_interval_s,
            request_timeout_s=client.request_timeout_s,
            margin_s=lease_margin_s,
        ):
            raise ValueError(
                f"keepalive interval {keepalive_interval_s}s + request timeout {client.request_timeout_s}s "
                f"must be below the lease TTL {ttl_s}s minus margin {lease_margin_s}s"
            )
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.lease_margin_s = lease_margin_s
        self.keepalive_interval_s = keepalive_interval_s
        self._clock = clock
        self._attempt_ids = attempt_ids
        self._observer = observer
        self._lease: LeaseState | None = None
        self._keepalive_scope: trio.CancelScope | None = None
        self._lost = trio.Event()

    @property
    def lease(self) -> LeaseState | None:
        return self._lease

    def _observe(self, operation: StoreOperation, outcome: StoreOutcome, started: float) -> None:
        if self._observer is not None:
            self._observer(operation, outcome, self._clock() - started)

    async def _timed(
        self,
        operation: StoreOperation,
        call: Callable[[], Awaitable[T]],
        judge: Callable[[T], StoreOutcome] = lambda _result: StoreOutcome.OK,
    ) -> T:
        """Run ``call`` and report its duration and outcome to the observer (not when cancelled)."""
        started = self._clock()
        try:
            result = await call()
        except StoreError as exc:
            self._observe(operation, error_outcome(exc), started)
            raise
        self._observe(operation, judge(result), started)
        return result

    def lease_valid(self, now: float) -> bool:
        """Whether the lease is certainly alive at ``now``: if not, stop serving (issue 14)."""
        return self._lease is not None and self._lease.valid(now)

    async def wait_lost(self) -> None:
        """Return once etcd said the lease is gone (a keepalive answered without TTL): for good."""
        await self._lost.wait()

    async def start(self, nursery: trio.Nursery) -> None:
        """Grant the lease, then keep it alive from a task in ``nursery``; raises StoreUnavailable."""
        sent_at = self._clock()
        granted = await self._timed(StoreOperation.GRANT, self._grant)
        self._lease = LeaseState(granted.lease_id, lease_valid_until(sent_at, granted.ttl_s, self.lease_margin_s))
        await nursery.start(self._keep_alive)

    async def _grant(self) -> GrantedLease:
        try:
            return decode_grant_reply_untrusted(await self.client.post("/v3/lease/grant", grant_request(self.ttl_s)))
        except BadReply as exc:
            raise StoreUnavailable(f"lease grant: {exc}") from exc

    async def _keep_alive(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew the lease every interval; stop once etcd says it is gone (no TTL in the reply)."""
        with trio.CancelScope() as scope:
            self._keepalive_scope = scope
            task_status.started()
            while self._lease is not None and not self._lease.lost:
                await trio.sleep(self.keepalive_interval_s)
                lease = self._lease
                sent_at = self._clock()
                try:
                    reply = await self.client.post("/v3/lease/keepalive", lease_request(lease.lease_id))
                    ttl_s = decode_keepalive_reply_untrusted(reply, lease.lease_id)
                except StoreError:
                    self._observe(StoreOperation.KEEPALIVE, StoreOutcome.UNAVAILABLE, sent_at)
                    continue  # validity runs out on its own; the next keepalive may succeed
                except BadReply:  # e.g. "no leader" from a member cut off from its quorum
                    self._observe(StoreOperation.KEEPALIVE, StoreOutcome.UNAVAILABLE, sent_at)
                    self.client.skip_endpoint()
                    continue
                self._observe(StoreOperation.KEEPALIVE, StoreOutcome.LEASE_LOST if ttl_s is None else StoreOutcome.OK, sent_at)
                if ttl_s is None:
                    self._lease = attrs.evolve(lease, lost=True)
                    self._lost.set()
                else:
                    valid_until = lease_valid_until(sent_at, ttl_s, self.lease_margin_s)
                    self._lease = attrs.evolve(lease, valid_until=valid_until)

    async def aclose(self) -> None:
        """Stop the keepalive task, revoke the lease (its records go with it), close the client."""
        if self._keepalive_scope is not None:
            self._keepalive_scope.cancel()
        lease, self._lease = self._lease, None
        try:
            if lease is not None and not lease.lost:
                body = lease_request(lease.lease_id)
                with contextlib.suppress(StoreError):  # unrevoked, the lease simply expires
                    await self._timed(StoreOperation.REVOKE, lambda: self.client.post("/v3/lease/revoke", body))
        finally:
            await self.client.aclose()

    async def register_node(self, node_id: str) -> None:
        """Put our node key under our lease if no live gateway has it; NodeIdInUse if one does.

        Ownership is by ``node_id``, so two live gateways with one id could each take the
        other's records for their own: the second to start refuses to.  The key goes with the
        lease (revoked on a clean stop, expired one TTL after a crash).
        """
        await self._timed(StoreOperation.REGISTER_NODE, lambda: self._register_node(node_id))

    async def _register_node(self, node_id: str) -> None:
        if self._lease is None or self._lease.lost:
            raise StoreUnavailable("no live lease to register under")
        key = node_key(self.prefix, node_id)
        value = StoredValue(owner=node_id, attempt=self._attempt_ids()).to_bytes()
        body = claim_txn_request(key, expected_revision=ABSENT_REVISION, value=value, lease_id=self._lease.lease_id)
        try:
            outcome = decode_txn_reply_untrusted(await self.client.post("/v3/kv/txn", body, txn=True), key, _NO_SESSION)
        except BadReply as exc:
            raise StoreAmbiguous(f"node key txn reply: {exc}") from exc
        if not outcome.succeeded:
            holder = outcome.current.lease_id if outcome.current is not None else 0
            raise NodeIdInUse(
                f"node_id {node_id!r} is in use by another live gateway (etcd lease {holder:x}); "
                "give each gateway its own node_id"
            )

    async def read_record(self, session_id: SessionId) -> EtcdRecord | None:
        """A linearizable read of the session's key, with its attempt id and lease."""
        return await self._timed(StoreOperation.READ, lambda: self._read_record(session_id))

    async def _read_record(self, session_id: SessionId) -> EtcdRecord | None:
        key = session_key(self.prefix, session_id)
        try:
            reply = await self.client.post("/v3/kv/range", range_request(key))
            return decode_range_reply_untrusted(reply, key, session_id)
        except BadReply as exc:
            raise StoreUnavailable(f"range: {exc}") from exc

    async def read(self, session_id: SessionId) -> OwnershipRecord | None:
        current = await self.read_record(session_id)
        return current.record if current else None

    async def claim(
        self, session_id: SessionId, node_id: str, *, expected_revision: int, ticket: SessionTicket | None = None
    ) -> CasResult:
        """Write ``node_id`` as owner under our lease iff the key is at ``expected_revision``.

        ``ticket``: put in the same transaction (no lease), replacing the peer's previous one.
        """
        attempt = self._attempt_ids()
        return await self.claim_attempt(
            session_id, node_id, expected_revision=expected_revision, attempt=attempt, ticket=ticket
        )

    async def claim_attempt(
        self,
        session_id: SessionId,
        node_id: str,
        *,
        expected_revision: int,
        attempt: str,
        ticket: SessionTicket | None = None,
    ) -> CasResult:
        """:meth:`claim` with a given attempt id: a retry after StoreAmbiguous passes the same one.

        An ambiguous txn is resolved by one re-read (:func:`resolve_attempt`); if that cannot
        decide, or fails, StoreAmbiguous is raised with the attempt id in its reason.
        """

        def body(value: bytes, lease_id: int) -> Json:
            key = session_key(self.prefix, session_id)
            txn = claim_txn_request(key, expected_revision=expected_revision, value=value, lease_id=lease_id)
            if ticket is None:
                return txn
            owned = attrs.evolve(ticket, owner=node_id)
            return with_ticket(txn, ticket_key(self.prefix, ticket.peer), encode_ticket(owned))

        return await self._timed(
            StoreOperation.CLAIM,
            lambda: self._claim_attempt(session_id, node_id, expected_revision=expected_revision, attempt=attempt, body=body),
            cas_outcome,
        )

    async def take_over(self, ticket: SessionTicket, node_id: str) -> CasResult:
        """Own the ticket's session iff it has no key and the ticket is unchanged (see the module docstring).

        The record's revision on success is the new fencing epoch.  Ambiguity is resolved as a
        claim's is: by our attempt id in the session key, or StoreAmbiguous.
        """

        def body(value: bytes, lease_id: int) -> Json:
            owned = attrs.evolve(ticket, owner=node_id)
            return takeover_txn_request(
                session_key(self.prefix, ticket.session_id),
                ticket_key_=ticket_key(self.prefix, ticket.peer),
                ticket_revision=ticket.revision,
                value=value,
                ticket_value=encode_ticket(owned),
                lease_id=lease_id,
            )

        attempt = self._attempt_ids()
        return await self._timed(
            StoreOperation.TAKE_OVER,
            lambda: self._claim_attempt(
                ticket.session_id, node_id, expected_revision=ABSENT_REVISION, attempt=attempt, body=body
            ),
            cas_outcome,
        )

    async def read_ticket(self, peer: str) -> SessionTicket | None:
        """A linearizable read of ``peer``'s ticket."""
        return await self._timed(StoreOperation.READ_TICKET, lambda: self._read_ticket(peer))

    async def _read_ticket(self, peer: str) -> SessionTicket | None:
        key = ticket_key(self.prefix, peer)
        try:
            return decode_ticket_range_untrusted(await self.client.post("/v3/kv/range", range_request(key)), key, peer)
        except BadReply as exc:
            raise StoreUnavailable(f"ticket range: {exc}") from exc

    async def forget_ticket(self, peer: str, *, expected_revision: int) -> bool:
        """Delete ``peer``'s ticket iff still at ``expected_revision``; StoreUnavailable if unsure."""
        return await self._timed(
            StoreOperation.FORGET_TICKET, lambda: self._forget_ticket(peer, expected_revision=expected_revision)
        )

    async def _forget_ticket(self, peer: str, *, expected_revision: int) -> bool:
        body = forget_ticket_txn_request(ticket_key(self.prefix, peer), expected_revision=expected_revision)
        try:
            return decode_succeeded_untrusted(await self.client.post("/v3/kv/txn", body, txn=True))
        except BadReply as exc:
            raise StoreUnavailable(f"ticket delete reply: {exc}") from exc
        except StoreAmbiguous as exc:
            raise StoreUnavailable(f"ticket delete: {exc.reason}") from exc

    async def _claim_attempt(
        self,
        session_id: SessionId,
        node_id: str,
        *,
        expected_revision: int,
        attempt: str,
        body: Callable[[bytes, int], Json],
    ) -> CasResult:
        if self._lease is None or self._lease.lost:
            raise StoreUnavailable("no live lease to claim under")
        key = session_key(self.prefix, session_id)
        txn = body(StoredValue(owner=node_id, attempt=attempt).to_bytes(), self._lease.lease_id)
        try:
            reply = await self.client.post("/v3/kv/txn", txn, txn=True)
            return claim_result(decode_txn_reply_untrusted(reply, key, session_id), session_id, node_id)
        except BadReply as exc:
            first = f"txn reply: {exc}"
        except StoreAmbiguous as exc:
            first = exc.reason
        try:
            current = await self._read_record(session_id)
        except StoreUnavailable as exc:
            raise StoreAmbiguous(f"attempt {attempt}: {first}; re-read failed: {exc.reason}") from exc
        resolution = resolve_attempt(current, expected_revision=expected_revision, attempt=attempt)
        if resolution is Resolution.UNKNOWN:
            raise StoreAmbiguous(f"attempt {attempt}: {first}; key unchanged, txn may still land")
        return CasResult(resolution is Resolution.WON, current.record if current else None)

    async def release(self, session_id: SessionId, node_id: str, *, expected_revision: int) -> CasResult:
        """Delete the record iff ``node_id`` owns it at ``expected_revision``.

        The owner check reads first; the delete then compares ``mod_revision``, which names that
        very write, so nothing can slip in between.  An ambiguous delete raises StoreUnavailable
        (the caller cannot tell whether it still owns the session; the lease ends it anyway).
        """
        return await self._timed(
            StoreOperation.RELEASE,
            lambda: self._release(session_id, node_id, expected_revision=expected_revision),
            cas_outcome,
        )

    async def _release(self, session_id: SessionId, node_id: str, *, expected_revision: int) -> CasResult:
        current = await self._read_record(session_id)
        if not may_release(current, node_id, expected_revision):
            return CasResult(False, current.record if current else None)
        key = session_key(self.prefix, session_id)
        try:
            body = release_txn_request(key, expected_revision=expected_revision)
            reply = await self.client.post("/v3/kv/txn", body, txn=True)
            return release_result(decode_txn_reply_untrusted(reply, key, session_id))
        except BadReply as exc:
            raise StoreUnavailable(f"release txn reply: {exc}") from exc
        except StoreAmbiguous as exc:
            raise StoreUnavailable(f"release: {exc.reason}") from exc

    async def lease_time_to_live(self, lease_id: int) -> int | None:
        """Seconds etcd gives ``lease_id`` still, or None when it is gone (for tests and status)."""
        return await self._timed(StoreOperation.TIME_TO_LIVE, lambda: self._time_to_live(lease_id))

    async def _time_to_live(self, lease_id: int) -> int | None:
        try:
            reply = await self.client.post("/v3/lease/timetolive", lease_request(lease_id))
            return decode_timetolive_reply_untrusted(reply)
        except BadReply as exc:
            raise StoreUnavailable(f"timetolive: {exc}") from exc


@contextlib.asynccontextmanager
async def open_etcd_ownership_store(
    endpoints: Sequence[str],
    *,
    request_timeout_s: float,
    lease_ttl_ms: int,
    lease_margin_s: float,
    keepalive_interval_s: float,
    prefix: str = DEFAULT_PREFIX,
    node_id: str | None = None,
    observer: StoreObserver | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[EtcdOwnershipStore]:
    """A started store with its own nursery for the keepalive task; revoked and closed on exit.

    ``node_id``: registered at start (:meth:`EtcdOwnershipStore.register_node`).  ``observer``:
    hears every call's latency (:data:`StoreObserver`).  ``transport``: replaces the network
    (tests; the lab's members in network namespaces are reached through unix sockets).  A store that
    cannot start (no member grants the lease, the node id is taken) raises its StoreError as
    it is, not inside an exception group, so that a caller can turn it into one line.
    """
    client = EtcdClient(endpoints, request_timeout_s=request_timeout_s, transport=transport)
    try:
        store = EtcdOwnershipStore(
            client,
            lease_ttl_ms=lease_ttl_ms,
            lease_margin_s=lease_margin_s,
            keepalive_interval_s=keepalive_interval_s,
            prefix=prefix,
            observer=observer,
        )
    except ValueError:
        await client.aclose()
        raise
    failure: StoreError | None = None
    async with trio.open_nursery() as nursery:
        try:
            try:
                await store.start(nursery)
                if node_id is not None:
                    await store.register_node(node_id)
            except StoreError as exc:
                failure = exc  # raised below, once the (empty) nursery is closed
            else:
                yield store
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()
    if failure is not None:
        raise failure
