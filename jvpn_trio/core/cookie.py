"""Handshake admission under load: cookies, per-source token buckets, a handshake work budget.

Theory of operation
-------------------
A HANDSHAKE_INIT with a valid mac1 costs the gateway X25519 operations, and
mac1 proves only that the sender knows the gateway's public key (every client
config holds it).  A flood of such inits must not starve live sessions (issue
15), so :class:`HandshakeGate` decides, per init and before any DH, what it
may cost (WireGuard's answer, whitepaper 5.4.7, in our own terms):

0. Under load, once the cookie-reply budget (3.) is spent, an init without mac2 is dropped
   before anything else, even mac1 (:meth:`HandshakeGate.shed`): it could have had nothing
   but a cookie reply, and this keeps the bulk of a flood at the cost of a length check.
1. Every init that passes mac1 is counted by the **load meter**.  The gateway
   is *under load* while more than ``under_load_per_s`` inits arrive per
   second (a token bucket of that rate and one second of burst runs dry) or
   the handshake queue holds ``under_load_queue`` or more, and for
   ``load_hold_s`` after either last happened.
2. The sender's IP address takes a token from its own bucket
   (``per_source_per_s``, ``per_source_burst``); none left: dropped
   (SOURCE_LIMITED).  The table keeps the ``source_table_size`` most recently
   seen addresses and forgets the least recent one beyond that, so its memory
   is bounded whatever the number of sources; a forgotten address starts again
   with a full bucket, which is why the work budget (4.) exists too.
3. Under load, an init without a valid mac2 gets only a COOKIE_REPLY (while
   the cookie-reply budget ``cookie_replies_per_s`` lasts; past it, nothing:
   COOKIE_LIMITED).  The cookie is ``BLAKE2s-128(key = secret, "ip:port")``:
   only a sender that receives datagrams at its address can learn it, so a
   spoofed flood never gets past this step.  The secret is drawn anew every
   ``cookie_rotation_s`` and the previous one is still accepted, so a cookie
   is good for one to two rotation periods.  The reply is sealed with
   ChaCha20-Poly1305 under ``HASH(LABEL_COOKIE || gateway public key)`` with
   the init's mac1 as associated data: only the initiator of that init can
   open it, and replaying it later answers no init the client still waits for.
4. An init let through is queued (ACCEPT) for the handshake worker, which
   takes a token from the global work budget (``handshakes_per_s``,
   ``handshake_burst``) before each one (:meth:`HandshakeGate.work_delay`):
   the DH work per second is bounded whatever gets this far.

Not under load, mac2 is not checked at all, so a client without a cookie
handshakes exactly as before.  Cost per init before a decision: one mac1
hash, bucket arithmetic and, under load, one or two MACs (mac2) or one MAC and
one small AEAD seal (a cookie reply, smaller than the init: no amplification).

Everything here is a pure function of its inputs and ``now``; the secret's
randomness comes from the injected ``random_bytes``.
"""

from __future__ import annotations

import enum
import hashlib
from collections import OrderedDict

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from jvpn_trio.core import wire
from jvpn_trio.core.bounds import int_range, number_range
from jvpn_trio.core.ids import RandomBytes
from jvpn_trio.core.noise import mac2_ok
from jvpn_trio.core.ratelimit import TokenBucket

#: Domain separator for the key COOKIE_REPLY is sealed with.
LABEL_COOKIE = b"cookie--"
#: Bytes of a cookie secret (a BLAKE2s key).
SECRET_LEN = 32


@attrs.frozen(kw_only=True)
class HandshakeLimits:
    """The gateway's bounds on handshake work (``[handshake]`` in gateway.toml, docs/threat-model.md).

    Ranges are checked here, so a config value out of range is a one-line error.
    """

    #: How often the cookie secret is drawn anew (a cookie stays good for one to two periods).
    cookie_rotation_s: float = attrs.field(default=120.0, validator=number_range(1.0, 3600.0))
    #: Inits per second (all sources) above which the gateway is under load and asks for cookies.
    under_load_per_s: float = attrs.field(default=100.0, validator=number_range(1.0, 1_000_000.0))
    #: Queued inits at or above which the gateway is under load.
    under_load_queue: int = attrs.field(default=16, validator=int_range(1, 1_000_000))
    #: How long the gateway stays under load after the last sign of it.
    load_hold_s: float = attrs.field(default=1.0, validator=number_range(0.0, 3600.0))
    #: Inits per second one source IP address may have looked at (sustained), and its burst.
    per_source_per_s: float = attrs.field(default=20.0, validator=number_range(0.01, 1_000_000.0))
    per_source_burst: int = attrs.field(default=40, validator=int_range(1, 1_000_000))
    #: Source addresses whose bucket is remembered; the least recently seen is forgotten beyond this.
    source_table_size: int = attrs.field(default=16384, validator=int_range(1, 10_000_000))
    #: Handshakes (DH work) per second the worker does at most, and its burst.
    handshakes_per_s: float = attrs.field(default=200.0, validator=number_range(1.0, 1_000_000.0))
    handshake_burst: int = attrs.field(default=50, validator=int_range(1, 1_000_000))
    #: Cookie replies per second at most (one second's worth of burst).
    cookie_replies_per_s: float = attrs.field(default=5_000.0, validator=number_range(1.0, 10_000_000.0))
    #: Inits waiting for the worker at most; one more is dropped and counted.
    queue_capacity: int = attrs.field(default=128, validator=int_range(1, 1_000_000))

    def __attrs_post_init__(self) -> None:
        if self.under_load_queue > self.queue_capacity:
            raise ValueError(
                f"under_load_queue: {self.under_load_queue} is more than queue_capacity {self.queue_capacity}"
                " (the queue could never reach it)"
            )


class SourceBuckets:
    """One :class:`TokenBucket` per source key, at most ``size`` of them (least recently seen goes)."""

    def __init__(self, *, rate: float, burst: float, size: int) -> None:
        self._rate, self._burst, self._size = rate, burst, size
        # An OrderedDict, not a dict: evicting from the front of a plain dict rescans its holes (O(n)).
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, *, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._size:
                self._buckets.popitem(last=False)  # the least recently seen
            bucket = self._buckets[key] = TokenBucket.full(self._rate, self._burst, now=now)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now=now)


def source_key(host: str, port: int) -> str:
    """What a cookie is bound to: the address and port the init came from."""
    return f"{host}:{port}"


def cookie_seal_key(gateway_public: bytes) -> bytes:
    """The key COOKIE_REPLYs from the owner of ``gateway_public`` are sealed with."""
    return hashlib.blake2s(LABEL_COOKIE + gateway_public).digest()


def open_cookie_reply(reply: wire.CookieReply, *, gateway_public: bytes, init_mac1: bytes) -> bytes | None:
    """The cookie in ``reply`` if it answers the init whose mac1 is ``init_mac1``; None otherwise."""
    try:
        return ChaCha20Poly1305(cookie_seal_key(gateway_public)).decrypt(reply.nonce, reply.sealed_cookie, init_mac1)
    except InvalidTag:
        return None


class CookieMint:
    """The gateway's cookie secret (rotated every ``rotation_s``) and what it makes and checks."""

    def __init__(self, *, gateway_public: bytes, rotation_s: float, random_bytes: RandomBytes, now: float) -> None:
        self._aead = ChaCha20Poly1305(cookie_seal_key(gateway_public))
        self._rotation_s = rotation_s
        self._random_bytes = random_bytes
        self._secret = random_bytes(SECRET_LEN)
        self._previous: bytes | None = None
        self._drawn_at = now

    def _rotate(self, now: float) -> None:
        age = now - self._drawn_at
        if age >= self._rotation_s:
            # The previous secret stays good for one period after it was replaced, never longer.
            self._previous = self._secret if age < 2 * self._rotation_s else None
            self._secret = self._random_bytes(SECRET_LEN)
            self._drawn_at = now

    def cookie(self, source: str, *, now: float) -> bytes:
        self._rotate(now)
        return _cookie_of(self._secret, source)

    def mac2_valid(self, init: bytes, source: str, *, now: float) -> bool:
        """Whether raw HANDSHAKE_INIT ``init`` carries a mac2 keyed with a cookie of ours for ``source``."""
        if len(init) != wire.HANDSHAKE_INIT_MAC2_LEN:
            return False
        self._rotate(now)
        if mac2_ok(init, _cookie_of(self._secret, source)):
            return True
        return self._previous is not None and mac2_ok(init, _cookie_of(self._previous, source))

    def reply(self, init: bytes, source: str, *, nonce: bytes, now: float) -> wire.CookieReply:
        """The COOKIE_REPLY answering raw HANDSHAKE_INIT ``init`` (mac1 already checked) from ``source``."""
        return wire.decode_cookie_reply_untrusted(self.reply_datagram(init, source, nonce=nonce, now=now))

    def reply_datagram(self, init: bytes, source: str, *, nonce: bytes, now: float) -> bytes:
        """:meth:`reply`, encoded: the gateway's hot path under a flood, so no message object."""
        mac1 = init[wire.HANDSHAKE_INIT_MAC1_OFFSET : wire.HANDSHAKE_INIT_LEN]
        sealed = self._aead.encrypt(nonce, self.cookie(source, now=now), mac1)
        return wire.pack_cookie_reply(int.from_bytes(init[2:6], "big"), nonce, sealed)


def _cookie_of(secret: bytes, source: str) -> bytes:
    return hashlib.blake2s(source.encode(), digest_size=wire.COOKIE_LEN, key=secret).digest()


class Verdict(enum.Enum):
    """What :meth:`HandshakeGate.admit` decides for one init (the gateway counts each but ACCEPT)."""

    ACCEPT = "accept"  # queue it for the handshake worker
    COOKIE = "cookie"  # under load without a valid mac2: answer with a COOKIE_REPLY, nothing more
    SOURCE_LIMITED = "source_limited"  # its source address's bucket is empty
    COOKIE_LIMITED = "cookie_limited"  # would get a cookie, but the cookie-reply budget is spent


class HandshakeGate:
    """Per-init decisions and the worker's budget: see the module docstring."""

    def __init__(self, limits: HandshakeLimits, *, gateway_public: bytes, random_bytes: RandomBytes, now: float) -> None:
        self.limits = limits
        self.mint = CookieMint(
            gateway_public=gateway_public, rotation_s=limits.cookie_rotation_s, random_bytes=random_bytes, now=now
        )
        self._load = TokenBucket.full(limits.under_load_per_s, limits.under_load_per_s, now=now)
        self._loaded_until = -float("inf")
        self._sources = SourceBuckets(
            rate=limits.per_source_per_s, burst=limits.per_source_burst, size=limits.source_table_size
        )
        self._cookies = TokenBucket.full(limits.cookie_replies_per_s, limits.cookie_replies_per_s, now=now)
        self._work = TokenBucket.full(limits.handshakes_per_s, limits.handshake_burst, now=now)

    def under_load(self, *, now: float) -> bool:
        return now < self._loaded_until

    def shed(self, length: int, *, now: float) -> bool:
        """Whether an init of ``length`` bytes can be dropped before even its mac1 is checked.

        Under load, an init without mac2 could get nothing but a cookie reply, so once the
        cookie-reply budget is spent it gets nothing at all: the bulk of a spoofed flood then
        costs a length check, not a hash, a bucket and an AEAD seal.  Counted as COOKIE_LIMITED.
        """
        return now < self._loaded_until and length != wire.HANDSHAKE_INIT_MAC2_LEN and self._cookies.empty(now=now)

    def admit(self, init: bytes, host: str, port: int, *, queued: int, now: float) -> Verdict:
        """Decide for raw HANDSHAKE_INIT ``init`` (mac1 already checked) from ``(host, port)``.

        ``queued``: inits now waiting for the worker.
        """
        if not self._load.take(now=now) or queued >= self.limits.under_load_queue:
            self._loaded_until = now + self.limits.load_hold_s
        if not self._sources.take(host, now=now):
            return Verdict.SOURCE_LIMITED
        if now < self._loaded_until and not self.mint.mac2_valid(init, source_key(host, port), now=now):
            return Verdict.COOKIE if self._cookies.take(now=now) else Verdict.COOKIE_LIMITED
        return Verdict.ACCEPT

    def cookie_reply(self, init: bytes, host: str, port: int, *, nonce: bytes, now: float) -> bytes:
        """The COOKIE_REPLY datagram :attr:`Verdict.COOKIE` asks for (``nonce``: fresh random bytes)."""
        return self.mint.reply_datagram(init, source_key(host, port), nonce=nonce, now=now)

    def work_delay(self, *, now: float) -> float:
        """Seconds the worker waits before its next handshake (its budget token is taken already)."""
        return self._work.reserve(now=now)
