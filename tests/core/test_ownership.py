"""ownership.classify: every branch, and which one wins when several apply (spec 10, Property 9).

Determinism: pure function over explicit records.
"""

from __future__ import annotations

import attrs
import pytest

from jvpn_trio.core.ids import SessionId
from jvpn_trio.core.ownership import Ownership, OwnershipRecord, OwnershipVerdict, classify
from jvpn_trio.core.states import ReasonCode as R

SID = SessionId(bytes(range(16)))
OTHER_SID = SessionId(bytes(range(16, 32)))
NODE = "gw-a"


def record(**overrides: object) -> OwnershipRecord:
    fields: dict[str, object] = dict(session_id=SID, owner=NODE, revision=7)
    fields.update(overrides)
    return OwnershipRecord(**fields)  # type: ignore[arg-type]


def verdict(rec: OwnershipRecord | None, *, held_revision: int = 7) -> OwnershipVerdict:
    return classify(rec, session_id=SID, node_id=NODE, held_revision=held_revision)


CASES = [
    ("owned", record(), OwnershipVerdict(Ownership.OWNED, None, "owned at the held revision")),
    (
        "no record",
        None,
        OwnershipVerdict(Ownership.AMBIGUOUS, R.OWNERSHIP_AMBIGUOUS, "no ownership record (lease expired?)"),
    ),
    (
        "record for another session",
        record(session_id=OTHER_SID),
        OwnershipVerdict(Ownership.AMBIGUOUS, R.OWNERSHIP_AMBIGUOUS, "record is for another session"),
    ),
    ("another owner", record(owner="gw-b"), OwnershipVerdict(Ownership.NOT_OWNER, R.NOT_OWNER, "owned by gw-b")),
    (
        "newer revision",
        record(revision=8),
        OwnershipVerdict(
            Ownership.AMBIGUOUS, R.OWNERSHIP_AMBIGUOUS, "store revision 8 differs from held revision 7"
        ),
    ),
    (
        "older revision",
        record(revision=6),
        OwnershipVerdict(
            Ownership.AMBIGUOUS, R.OWNERSHIP_AMBIGUOUS, "store revision 6 differs from held revision 7"
        ),
    ),
    # -- precedence -----------------------------------------------------------------------
    (
        "another session beats another owner",
        record(session_id=OTHER_SID, owner="gw-b", revision=9),
        OwnershipVerdict(Ownership.AMBIGUOUS, R.OWNERSHIP_AMBIGUOUS, "record is for another session"),
    ),
    (
        "another owner beats a revision mismatch",
        record(owner="gw-b", revision=9),
        OwnershipVerdict(Ownership.NOT_OWNER, R.NOT_OWNER, "owned by gw-b"),
    ),
]


@pytest.mark.parametrize(("rec", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_classify(rec: OwnershipRecord | None, expected: OwnershipVerdict) -> None:
    assert verdict(rec) == expected


def test_only_owned_has_no_reason() -> None:
    for _name, rec, _expected in CASES:
        v = verdict(rec)
        assert (v.reason is None) == (v.ownership is Ownership.OWNED)


def test_owner_name_is_compared_exactly() -> None:
    assert verdict(record(owner="GW-A")).ownership is Ownership.NOT_OWNER
    assert verdict(record(owner="gw-a ")).ownership is Ownership.NOT_OWNER


def test_held_revision_is_the_one_compared() -> None:
    assert verdict(record(revision=8), held_revision=8).ownership is Ownership.OWNED


def test_record_is_frozen_and_keyword_only() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        record().owner = "gw-b"  # type: ignore[misc]
    with pytest.raises(TypeError):
        OwnershipRecord(SID, NODE, 7)  # type: ignore[misc]
