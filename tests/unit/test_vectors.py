"""roundlog against the shared test vectors of ``schemas/vectors`` (the Java and TypeScript clients
check themselves against the same files).

Each check compares roundlog with a computation of its own: fastavro's JSON decoder for the
Avro JSON values, Kafka's published murmur2 cases, ``cryptography``'s Ed25519 verification,
the standard library's UUIDv5 and sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from importlib import resources
from typing import Any

import fastavro
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

from roundlog.arrays import Reassembler, StreamError, raw_chunks, sha256_of, specs_of, wire_dtype
from roundlog.bus import partition_for
from roundlog.codec import HEADER_SIZE, decode, encode, schema_json
from roundlog.domain.events import EVENT_TYPES, ArraySpec, Task, derived_id, partition_key, update_id_for
from roundlog.keys import Signer, key_id_of

from tests.contract.make_vectors import FILES, render

VECTORS = resources.files("roundlog") / "schemas" / "vectors"


def vectors(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(FILES))
def test_the_checked_in_vectors_are_what_roundlog_writes_today(name: str) -> None:
    """A change to any byte of the contract shows here first: rewrite the files on purpose
    (``python -m tests.contract.make_vectors``), never by accident."""
    assert (VECTORS / name).read_text(encoding="utf-8") == render(FILES[name])


def test_there_is_a_vector_for_every_event_type() -> None:
    assert sorted(case["type"] for case in vectors("events.json")["events"]) == sorted(
        t.__name__ for t in EVENT_TYPES
    )


EVENT_CASES = vectors("events.json")["events"]


@pytest.mark.parametrize("case", EVENT_CASES, ids=[c["type"] for c in EVENT_CASES])
def test_an_events_json_value_and_its_bytes_are_one_event(case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["single_object"])
    event = decode(data)
    assert type(event).__name__ == case["type"]
    assert encode(event) == data
    assert data[:2] == b"\xc3\x01" and data[2:HEADER_SIZE].hex() == case["fingerprint"]
    assert partition_key(event) == case["partition_key"]
    # fastavro's JSON decoder, not roundlog's codec, reads the JSON value
    schema = fastavro.parse_schema(schema_json(type(event)))
    from_json = next(fastavro.json_reader(io.StringIO(json.dumps(case["avro_json"])), schema))
    from_bytes = fastavro.schemaless_reader(io.BytesIO(data[HEADER_SIZE:]), schema, None)
    assert from_json == from_bytes


#: Kafka's own murmur2 cases (clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java).
KAFKA_MURMUR2 = {
    "21": -973932308,
    "foobar": -790332482,
    "a-little-bit-long-string": -985981536,
    "a-little-bit-longer-string": -1486304829,
    "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    "abc": 479470107,
}


@pytest.mark.parametrize("key", KAFKA_MURMUR2)
def test_partitioning_is_kafkas_murmur2(key: str) -> None:
    for count in (1, 6, 12, 7):
        assert partition_for(key, count) == (KAFKA_MURMUR2[key] & 0x7FFFFFFF) % count


def test_every_partition_vector_is_where_roundlog_puts_the_key() -> None:
    table = vectors("partitions.json")
    for case in table["keys"]:
        for count, partition in case["partitions"].items():
            assert partition == (case["murmur2"] & 0x7FFFFFFF) % int(count)
            assert partition_for(case["key"], int(count)) == partition


def test_signature_vectors_verify_and_roundlog_signs_them_byte_for_byte() -> None:
    table = vectors("signatures.json")
    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(table["private_key_seed"]))
    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(table["key_id"]))
    assert key_id_of(private) == table["key_id"]
    signer = Signer(private, table["key_id"])
    for case in table["cases"]:
        value = bytes.fromhex(case["value"])
        message = table["context"].encode() + table["key_id"].encode() + b"\n" + value
        assert message.hex() == case["signed_message"]
        signature = bytes.fromhex(case["headers"][table["signature_header"]])
        public.verify(signature, message)  # raises if it does not hold
        headers = dict(signer.headers(value))
        assert headers[table["key_header"]] == case["headers"][table["key_header"]].encode()
        assert headers[table["signature_header"]] == signature


def test_id_vectors_are_uuid5_of_the_joined_parts() -> None:
    table = vectors("ids.json")
    namespace = uuid.UUID(table["namespace"])
    assert namespace == uuid.uuid5(uuid.NAMESPACE_URL, "roundlog.v1")
    for case in table["derived"]:
        assert case["id"] == str(uuid.uuid5(namespace, "/".join(case["parts"]))) == derived_id(*case["parts"])
    for case in table["answers"]:
        prefix = f"{case['round_id']}/client/{case['client_id']}"
        assert case["update_id"] == str(uuid.uuid5(namespace, f"{prefix}/update"))
        assert case["update_id"] == update_id_for(case["round_id"], case["client_id"])
        for task in Task:
            assert case["event_ids"][task.value] == str(uuid.uuid5(namespace, f"{prefix}/{task.value}"))


@given(st.lists(st.text(), min_size=1, max_size=4))
def test_every_derived_id_is_the_standard_librarys_uuid5(parts: list[str]) -> None:
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, "roundlog.v1")
    assert derived_id(*parts) == str(uuid.uuid5(namespace, "/".join(parts)))


def test_tensor_vectors_are_the_arrays_raw_little_endian_bytes_in_chunks() -> None:
    table = vectors("tensors.json")
    arrays = [
        (a["name"], np.array(a["values"], dtype=np.dtype(a["dtype"])).reshape(a["shape"]))
        for a in table["arrays"]
    ]
    # the stream by hand: each array's bytes in little-endian C order, concatenated
    stream = b"".join(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes() for _, a in arrays)
    assert stream.hex() == table["stream"]
    assert hashlib.sha256(stream).hexdigest() == table["sha256"] == sha256_of(arrays)
    records = table["records"]
    assert b"".join(bytes.fromhex(r["value"]) for r in records) == stream
    assert all(len(bytes.fromhex(r["value"])) <= table["chunk_bytes"] for r in records)
    assert [r["headers"]["roundlog-chunk"] for r in records] == [str(n) for n in range(len(records))]
    assert [bytes(c).hex() for c in raw_chunks(arrays, table["chunk_bytes"])] == [r["value"] for r in records]
    ref = table["tensor_ref"]
    assert (ref["chunks"], ref["nbytes"], ref["sha256"]) == (len(records), len(stream), table["sha256"])
    assert [s.dtype for s in specs_of(arrays)] == [a["dtype"] for a in ref["arrays"]]
    # and back: the records reassemble into the arrays, whatever the chunk boundaries
    specs = tuple(ArraySpec(name=a["name"], dtype=a["dtype"], shape=tuple(a["shape"])) for a in ref["arrays"])
    back = [np.zeros(spec.shape, dtype=wire_dtype(spec.dtype)).reshape(-1) for spec in specs]
    reassembler = Reassembler(specs)
    for record in records:
        for piece in reassembler.feed(bytes.fromhex(record["value"])):
            back[piece.index][piece.start : piece.start + piece.values.size] = piece.values
    reassembler.finish(ref["sha256"])
    for (_, array), flat in zip(arrays, back, strict=True):
        assert np.array_equal(flat.reshape(array.shape), array)


def test_dtype_spellings_name_one_little_endian_dtype() -> None:
    table = vectors("tensors.json")["dtypes"]
    for spellings in table["same"]:
        assert len({wire_dtype(s) for s in spellings}) == 1
        assert wire_dtype(spellings[0]).str == spellings[0]
    for spelling in table["refused"]:
        with pytest.raises(StreamError) as refused:
            wire_dtype(spelling)
        assert refused.value.reason == "dtype_mismatch"
