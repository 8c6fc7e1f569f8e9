from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import gmpy2  # type: ignore[import-untyped]
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from storage.psi import read_message, write_alignment, write_message
from storage.store import Store, read_table
from tasks.prepare.align import hash_keys
from tasks.vertical.psi_curve import (
    POINT_BYTES,
    PSIError,
    check_keys,
    hash_to_point,
    hash_to_points,
    prepare_keys,
)
from tasks.vertical.psi_memory import PSIRun, run_psi
from tasks.vertical.psi_protocol import (
    ALIGN_ID,
    ROW,
    AlignmentMessage,
    BlindedSet,
    Message,
    PartySecret,
    blind_own,
    derive_secret,
    intersect,
    message_from_arrow,
    reblind,
    receive_alignment,
)

SECRET = b"consortium-secret"
P25519 = 2**255 - 19


def _keys(prefix: str, ids: Mapping[int, None] | range | list[int]) -> pl.Series:
    return pl.Series([f"{prefix}{i:06d}" for i in ids], dtype=pl.String)


def _secrets(*parties: str, run_id: str = "run-1") -> dict[str, PartySecret]:
    return {
        p: derive_secret(b"master-of-" + p.encode() * 8, run_id=run_id, party=p) for p in parties
    }


def _random_parties(
    rng: np.random.Generator, n_parties: int, size: int, overlap: float
) -> dict[str, pl.Series]:
    """Parties drawing from a shared pool (overlap) plus ids of their own, shuffled."""
    shared = int(size * overlap)
    pool = rng.choice(10 * size, size=shared, replace=False)
    parties: dict[str, pl.Series] = {}
    for i in range(n_parties):
        name = "abcdefg"[i]
        own = [f"{name}-only-{j}" for j in range(size - shared)]
        take = rng.choice(pool, size=int(shared * rng.uniform(0.5, 1.0)), replace=False)
        keys = [f"cust{k:07d}" for k in take] + own
        rng.shuffle(keys)
        parties[name] = pl.Series(keys, dtype=pl.String)
    return parties


def _entities(run: PSIRun, parties: Mapping[str, pl.Series]) -> dict[str, pl.DataFrame]:
    """Each party's alignment joined with its own keys (what the party can see itself)."""
    return {
        p: a.table.with_columns(key=parties[p].gather(a.table[ROW]))
        for p, a in run.alignments.items()
    }


# -- correctness ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n_parties", "size", "overlap", "seed"),
    [(2, 60, 0.5, 1), (2, 200, 0.9, 2), (3, 150, 0.8, 3), (3, 120, 0.3, 4), (4, 80, 0.9, 5)],
)
def test_intersection_equals_plain_set_intersection(
    n_parties: int, size: int, overlap: float, seed: int
) -> None:
    parties = _random_parties(np.random.default_rng(seed), n_parties, size, overlap)
    run = run_psi(parties, label_party="a", secret=SECRET)
    expected = set.intersection(*(set(k.to_list()) for k in parties.values()))
    assert expected  # the fixture makes overlapping sets
    seen = _entities(run, parties)
    for party, frame in seen.items():
        assert set(frame["key"].to_list()) == expected, party
        assert frame[ROW].is_sorted()
        assert frame[ALIGN_ID].str.len_chars().unique().to_list() == [32]
    # the same entity carries the same alignment id at every party
    base = seen["a"].select("key", ALIGN_ID)
    for party, frame in seen.items():
        joined = base.join(frame.select("key", ALIGN_ID), on="key", validate="1:1")
        assert joined.height == len(expected)
        assert (joined[ALIGN_ID] == joined[f"{ALIGN_ID}_right"]).all(), party


def test_label_party_need_not_come_first_and_tiny_sets() -> None:
    parties = {"b": _keys("c", [1, 2, 3]), "a": _keys("c", [3, 2, 9]), "c": _keys("c", [2, 3])}
    run = run_psi(parties, label_party="a", secret=SECRET)
    seen = _entities(run, parties)
    assert sorted(seen["a"]["key"].to_list()) == ["c000002", "c000003"]
    assert_frame_equal(
        seen["a"].select("key", ALIGN_ID).sort("key"), seen["c"].select("key", ALIGN_ID).sort("key")
    )


def test_scalar_multiplications_are_minimal() -> None:
    parties = {
        "a": _keys("c", range(50)),
        "b": _keys("c", range(30, 70)),
        "c": _keys("c", range(45)),
    }
    run = run_psi(parties, label_party="a", secret=SECRET)
    # a: own set once for all + re-blind each other set; others: own set + a's set
    assert run.scalar_mults == {"a": 50 + 40 + 45, "b": 40 + 50, "c": 45 + 50}
    kinds = [(type(m).__name__, m.sender, m.recipient) for m in run.transcript]
    assert kinds == [
        ("BlindedSet", "a", "b"),
        ("BlindedSet", "a", "c"),
        ("BlindedSet", "b", "a"),
        ("BlindedSet", "b", "a"),
        ("BlindedSet", "c", "a"),
        ("BlindedSet", "c", "a"),
        ("AlignmentMessage", "a", "b"),
        ("AlignmentMessage", "a", "c"),
    ]


def test_deterministic_with_fixed_secrets_fresh_otherwise() -> None:
    parties = _random_parties(np.random.default_rng(7), 3, 100, 0.7)
    one = run_psi(parties, label_party="a", secret=SECRET, secrets=_secrets("a", "b", "c"))
    two = run_psi(parties, label_party="a", secret=SECRET, secrets=_secrets("a", "b", "c"))
    assert one.transcript == two.transcript
    for p in parties:
        assert_frame_equal(one.alignments[p].table, two.alignments[p].table)
    fresh = run_psi(parties, label_party="a", secret=SECRET)
    other_run = run_psi(
        parties, label_party="a", secret=SECRET, secrets=_secrets("a", "b", "c", run_id="run-2")
    )
    for run in (fresh, other_run):
        for p in parties:
            assert_frame_equal(
                run.alignments[p].table.select(ROW), one.alignments[p].table.select(ROW)
            )
            assert set(run.alignments[p].table[ALIGN_ID]).isdisjoint(
                one.alignments[p].table[ALIGN_ID]
            )
        values = {bytes(m.values) for m in run.transcript if isinstance(m, BlindedSet)}
        assert values.isdisjoint(m.values for m in one.transcript if isinstance(m, BlindedSet))


def test_process_pool_gives_the_same_result() -> None:
    parties = _random_parties(np.random.default_rng(8), 3, 90, 0.8)
    secrets = _secrets("a", "b", "c")
    serial = run_psi(parties, label_party="a", secret=SECRET, secrets=secrets, chunk_size=1000)
    pooled = run_psi(
        parties, label_party="a", secret=SECRET, secrets=secrets, workers=2, chunk_size=16
    )
    assert pooled.transcript == serial.transcript
    for p in parties:
        assert_frame_equal(pooled.alignments[p].table, serial.alignments[p].table)


def test_step_by_step_matches_run_psi() -> None:
    """The API a flow drives, one party step at a time, with messages through a store."""
    parties = {"a": _keys("c", range(40)), "b": _keys("c", range(20, 60))}
    secrets = _secrets("a", "b")
    hashed = {
        p: prepare_keys(k, party=p, normalisation="strip_lower", secret=SECRET)
        for p, k in parties.items()
    }
    m1 = blind_own(hashed["a"], secrets["a"], party="a", to="b")
    m2 = blind_own(hashed["b"], secrets["b"], party="b", to="a")
    m3 = reblind(m1, secrets["b"], party="b")
    alignment_a, answers = intersect(
        40, secrets["a"], party="a", reblinded={"b": m3}, blinded={"b": m2}, min_overlap=20
    )
    alignment_b = receive_alignment(answers["b"], secrets["b"], party="b", own_count=40)
    whole = run_psi(parties, label_party="a", secret=SECRET, secrets=secrets)
    assert whole.transcript == [m1, m2, m3, answers["b"]]
    assert_frame_equal(alignment_a.table, whole.alignments["a"].table)
    assert_frame_equal(alignment_b.table, whole.alignments["b"].table)
    assert alignment_a.table[ROW].to_list() == list(range(20, 40))
    assert alignment_b.table[ROW].to_list() == list(range(20))


# -- hashing onto the curve --------------------------------------------------------------------------
def _on_curve(u_bytes: bytes) -> bool:
    u = int.from_bytes(u_bytes, "little")
    return u < P25519 and gmpy2.legendre((u**3 + 486662 * u**2 + u) % P25519, P25519) == 1


def test_hash_to_point_is_canonical_domain_separated_and_on_the_curve() -> None:
    hashed = hash_keys(_keys("c", range(300)), SECRET)
    points = hash_to_points(hashed)
    chunks = [points[i : i + 32] for i in range(0, len(points), 32)]
    assert len(set(chunks)) == 300
    assert all(c[31] < 0x80 and _on_curve(c) for c in chunks)
    digest = bytes.fromhex(hashed[0])
    assert hash_to_point(digest) == chunks[0]
    assert hash_to_point(digest) != hashlib.sha256(digest).digest()


def test_blinding_commutes_and_the_fast_loader_matches_the_public_api() -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    from tasks.vertical.psi_curve import _mult_chunk, _public_key_loader

    a, b = _secrets("a", "b")["a"].scalar, _secrets("a", "b")["b"].scalar
    h = hash_to_points(hash_keys(_keys("c", range(5)), SECRET))
    ab = _mult_chunk(b, _mult_chunk(a, h, False)[0], False)[0]
    ba = _mult_chunk(a, _mult_chunk(b, h, False)[0], False)[0]
    assert ab == ba
    digests = bytes.fromhex("".join(hash_keys(_keys("c", range(5)), SECRET).to_list()))
    assert _mult_chunk(a, digests, True)[0] == _mult_chunk(a, h, False)[0]
    key = X25519PrivateKey.from_private_bytes(a)
    u = h[:32]
    assert key.exchange(_public_key_loader()(u)) == key.exchange(
        X25519PublicKey.from_public_bytes(u)
    )


def test_blinded_values_are_curve_points() -> None:
    """No blinded value sits on the twist: which of the two it is would leak a bit of H(key)."""
    parties = _random_parties(np.random.default_rng(9), 3, 100, 0.6)
    run = run_psi(parties, label_party="a", secret=SECRET)
    for message in run.transcript:
        if isinstance(message, BlindedSet):
            assert all(_on_curve(v) for v in message.points())


def test_secrets_are_derived_per_run_and_party_and_never_shown() -> None:
    one = derive_secret(b"m" * 32, run_id="r1", party="a")
    assert one == derive_secret(b"m" * 32, run_id="r1", party="a")
    assert one != derive_secret(b"m" * 32, run_id="r2", party="a")
    assert one != derive_secret(b"m" * 32, run_id="r1", party="b")
    assert repr(one) == "PartySecret(<hidden>)"
    assert sorted(one.permutation(50).tolist()) == list(range(50))
    with pytest.raises(ValueError, match="at least 16 bytes"):
        derive_secret(b"short", run_id="r1", party="a")


# -- privacy -----------------------------------------------------------------------------------------
def _forbidden(keys: pl.Series) -> list[bytes]:
    """Every form of an entity's id a party must never reveal: raw, HMAC (hex and bytes), H."""
    hashed = hash_keys(keys, SECRET)
    points = hash_to_points(hashed)
    out: list[bytes] = []
    for i, (raw, h) in enumerate(zip(keys.to_list(), hashed.to_list(), strict=True)):
        out += [raw.encode(), h.encode(), bytes.fromhex(h), points[32 * i : 32 * i + 32]]
    return out


def _leaks(blobs: Mapping[str, bytes], forbidden: list[bytes]) -> list[str]:
    return [where for where, blob in blobs.items() for needle in forbidden if needle in blob]


def _message_bytes(message: Message) -> bytes:
    if isinstance(message, BlindedSet):
        return message.values + message.sender.encode() + message.recipient.encode()
    return message.positions + message.ids + message.sender.encode() + message.recipient.encode()


def test_no_id_hmac_or_unblinded_hash_leaves_a_party(tmp_path: Path) -> None:
    parties = {
        "a": _keys("cust", range(120)),
        "b": _keys("cust", range(60, 200)),
        "c": _keys("cust", range(90, 150)),
    }
    coordinator = Store(str(tmp_path / "coordinator"))
    written: list[str] = []
    run = run_psi(
        parties,
        label_party="a",
        secret=SECRET,
        on_message=lambda m: written.append(
            write_message(coordinator, m.to_arrow(), run_id="r1").uri
        ),
    )
    files = {str(p): p.read_bytes() for p in (tmp_path / "coordinator").rglob("*") if p.is_file()}
    assert len(files) == len(run.transcript) == len(written)
    for party, keys in parties.items():
        # no id form of any entity (inside the overlap or not), and no unblinded H(key)
        forbidden = _forbidden(keys)
        foreign = {
            f"message {i} {m.sender}->{m.recipient}": _message_bytes(m)
            for i, m in enumerate(run.transcript)
        }
        assert _leaks(foreign, forbidden) == [], party
        assert _leaks(files, forbidden) == [], party
        # alignment ids are opaque: none equals or contains an id form of any entity
        ids = b"".join(bytes.fromhex(x) for x in run.alignments[party].table[ALIGN_ID])
        assert _leaks({"ids": ids}, [f[:16] for f in _forbidden(keys)]) == []
    # the scan finds a value when it is there (the test would notice a leak)
    planted = hash_to_points(hash_keys(_keys("cust", [0]), SECRET))
    assert _leaks({"x": b"abc" + planted + b"def"}, _forbidden(_keys("cust", [0]))) == ["x"]


def test_received_values_do_not_match_own_blinded_values() -> None:
    """A party cannot test its own keys against what it receives: every comparison needs
    both scalars, and each side only ever holds its own."""
    parties = {
        "a": _keys("c", range(80)),
        "b": _keys("c", range(40, 120)),
        "c": _keys("c", range(60, 100)),
    }
    secrets = _secrets("a", "b", "c")
    run = run_psi(parties, label_party="a", secret=SECRET, secrets=secrets)
    for party, keys in parties.items():
        hashed = prepare_keys(keys, party=party, normalisation="strip_lower", secret=SECRET)
        own = set(blind_own(hashed, secrets[party], party=party, to="x").points())
        received: set[bytes] = set()
        for m in run.transcript:
            if isinstance(m, BlindedSet) and m.recipient == party:
                received |= set(m.points())
        assert received
        assert own.isdisjoint(received), party
        # nor after multiplying what it received by its own scalar once more
        again = reblind(
            BlindedSet("x", party, "own", b"".join(sorted(received))), secrets[party], party=party
        )
        assert own.isdisjoint(again.points()), party


def test_alignment_messages_are_sorted_and_shuffled_sets_hide_row_order() -> None:
    keys = _keys("c", range(200))
    secrets = _secrets("a", "b")
    run = run_psi({"a": keys, "b": keys}, label_party="a", secret=SECRET, secrets=secrets)
    answer = run.transcript[-1]
    assert isinstance(answer, AlignmentMessage)
    positions = np.frombuffer(answer.positions, dtype="<u4")
    assert positions.tolist() == list(range(200))
    # position k of b's set is row perm[k]; the permutation is far from the identity
    perm = secrets["b"].permutation(200)
    assert np.mean(perm == np.arange(200)) < 0.05


# -- errors ----------------------------------------------------------------------------------------
def test_overlap_below_minimum_names_parties_and_counts() -> None:
    parties = {
        "a": _keys("c", range(50)),
        "b": _keys("c", range(45, 85)),
        "c": _keys("c", range(40, 70)),
    }
    with pytest.raises(PSIError) as info:
        run_psi(parties, label_party="a", secret=SECRET, min_overlap=10)
    message = str(info.value)
    assert "only 5 entities are common to all parties a, b, c" in message
    assert "rows: a 50, b 40, c 30" in message
    assert "shared with a: b 5, c 10" in message
    assert "fusion.min_overlap = 10" in message
    assert (
        run_psi(parties, label_party="a", secret=SECRET, min_overlap=5).alignments["b"].table.height
        == 5
    )


def test_empty_overlap_and_empty_party() -> None:
    with pytest.raises(
        PSIError, match=r"no entity is common to all parties a, b .*same consortium secret"
    ):
        run_psi(
            {"a": _keys("x", range(5)), "b": _keys("y", range(5))}, label_party="a", secret=SECRET
        )
    with pytest.raises(PSIError, match="party b: no entity keys to intersect"):
        run_psi({"a": _keys("x", range(5)), "b": _keys("x", [])}, label_party="a", secret=SECRET)
    with pytest.raises(PSIError, match="at least two parties"):
        run_psi({"a": _keys("x", range(5))}, label_party="a", secret=SECRET)
    with pytest.raises(PSIError, match="label party 'z'"):
        run_psi({"a": _keys("x", range(5))}, label_party="z", secret=SECRET)


def test_keys_not_in_normalised_form_are_refused_without_showing_them() -> None:
    keys = pl.Series(["c1", "c2", "c3", "Secret-Id-42", "c5", " c6", "c7"])
    with pytest.raises(PSIError) as info:
        run_psi({"a": _keys("c", range(5)), "b": keys}, label_party="a", secret=SECRET)
    message = str(info.value)
    assert "party b: 2 of 7 entity keys are not in the consortium's normalised form" in message
    assert "'strip_lower'" in message
    assert "first at row 3" in message
    assert "Secret" not in message
    assert "c6" not in message
    check_keys(pl.Series(["MixedCase"]), party="b", normalisation="none")
    with pytest.raises(PSIError, match="first at row 1"):
        check_keys(pl.Series(["ok", " pad "]), party="b", normalisation="strip")
    with pytest.raises(PSIError, match=r"1 of 3 entity keys are missing \(first at row 2"):
        check_keys(pl.Series(["a", "b", None]), party="b", normalisation="strip")


def test_duplicate_keys_name_the_rows() -> None:
    keys = pl.Series(["c1", "dup-7", "c3", "c4", "dup-7", "c6"])
    with pytest.raises(PSIError) as info:
        run_psi({"a": keys, "b": _keys("c", range(5))}, label_party="a", secret=SECRET)
    message = str(info.value)
    assert "party a: the entity key at row 4 repeats the key at row 1" in message
    assert "dup-7" not in message
    hashed = hash_keys(pl.Series(["c1", "c1"]), SECRET)
    with pytest.raises(PSIError, match="row 1 repeats the key at row 0"):
        blind_own(hashed, derive_secret(b"m" * 16, run_id="r", party="b"), party="b", to="a")
    with pytest.raises(PSIError, match=r"64 lower-case hex characters .* row 0"):
        blind_own(
            pl.Series(["c1"]), derive_secret(b"m" * 16, run_id="r", party="b"), party="b", to="a"
        )


@pytest.mark.parametrize("u", [0, 1])
def test_low_order_points_in_a_message_are_refused(u: int) -> None:
    secrets = _secrets("a", "b")
    good = blind_own(hash_keys(_keys("c", range(3)), SECRET), secrets["a"], party="a", to="b")
    forged = BlindedSet("a", "b", "own", good.values + u.to_bytes(32, "little"))
    with pytest.raises(PSIError, match="set from a: value at position 3 is a low-order point"):
        reblind(forged, secrets["b"], party="b", chunk_size=2)


def test_own_key_hashing_to_a_low_order_point_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Practically impossible (a SHA-512 preimage), so the hash is replaced to get there."""
    monkeypatch.setattr(
        "tasks.vertical.psi_curve.hash_to_point",
        lambda d: bytes(32) if d[0] % 2 else hash_to_point(d),
    )
    hashed = hash_keys(_keys("c", range(20)), SECRET)
    bad = next(i for i, h in enumerate(hashed.to_list()) if int(h[:2], 16) % 2)
    with pytest.raises(PSIError, match=f"party b: own keys: the key at row {bad} hashes to a low"):
        blind_own(hashed, _secrets("b")["b"], party="b", to="a", chunk_size=3)


def test_malformed_or_misrouted_messages_are_refused() -> None:
    secrets = _secrets("a", "b")
    with pytest.raises(PSIError, match="not a whole number of 32-byte values"):
        BlindedSet("a", "b", "own", b"x" * 33)
    good = blind_own(hash_keys(_keys("c", range(4)), SECRET), secrets["a"], party="a", to="b")
    with pytest.raises(PSIError, match="addressed to b, not c"):
        reblind(good, secrets["b"], party="c")
    back = reblind(good, secrets["b"], party="b")
    with pytest.raises(PSIError, match="expected own, got reblinded"):
        reblind(BlindedSet("a", "b", "reblinded", back.values), secrets["b"], party="b")
    theirs = blind_own(hash_keys(_keys("c", range(4)), SECRET), secrets["b"], party="b", to="a")
    with pytest.raises(PSIError, match="b returned 4 re-blinded values for 5 sent"):
        intersect(5, secrets["a"], party="a", reblinded={"b": back}, blinded={"b": theirs})
    repeated = BlindedSet("b", "a", "own", theirs.values + theirs.values[:32])
    with pytest.raises(PSIError, match="a set from b repeats values"):
        intersect(4, secrets["a"], party="a", reblinded={"b": back}, blinded={"b": repeated})
    with pytest.raises(PSIError, match="need both sets from every other party"):
        intersect(4, secrets["a"], party="a", reblinded={}, blinded={"b": theirs})
    answer = AlignmentMessage("a", "b", (7).to_bytes(4, "little"), bytes(16))
    with pytest.raises(PSIError, match="positions out of range"):
        receive_alignment(answer, secrets["b"], party="b", own_count=4)


# -- IO ----------------------------------------------------------------------------------------------
def test_messages_and_alignment_through_stores(tmp_path: Path) -> None:
    parties = {"a": _keys("c", range(30)), "b": _keys("c", range(10, 40))}
    run = run_psi(parties, label_party="a", secret=SECRET, secrets=_secrets("a", "b"))
    coordinator = Store(str(tmp_path / "coordinator"))
    for message in run.transcript:
        ref = write_message(coordinator, message.to_arrow(), run_id="r1")
        assert message_from_arrow(read_message(ref.uri)) == message
    names = sorted(p.name for p in (tmp_path / "coordinator" / "aligned").iterdir())
    assert [n.rsplit("-", 1)[0] for n in names] == [
        "psi-r1-alignment-a-to-b",
        "psi-r1-blinded-a-to-b-own",
        "psi-r1-blinded-b-to-a-own",
        "psi-r1-blinded-b-to-a-reblinded",
    ]
    party = Store(str(tmp_path / "party-b"))
    ref = write_alignment(party, run.alignments["b"].table, run_id="r1")
    assert ref.uri == str(
        tmp_path / "party-b" / "aligned" / f"psi-alignment-r1-{ref.sha256[:12]}.parquet"
    )
    assert_frame_equal(read_table(ref, verify=True), run.alignments["b"].table)
    with pytest.raises(ValueError, match=r"run id '\.\./x'"):
        write_alignment(party, run.alignments["b"].table, run_id="../x")
    assert POINT_BYTES == 32
