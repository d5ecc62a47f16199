"""Write the shared test vectors in ``schemas/vectors/``: ``python -m tests.contract.make_vectors``.

The files are the contract every client checks itself against, in every language: an event of
each type as Avro JSON and as its exact single-object bytes, a record signed with a known key,
a model cut into tensor chunks, the ids a client must derive, and the partition of a set of
keys. They are checked in: a change to any byte shows in review, and ``test_vectors`` fails
until the files are written again.
"""

from __future__ import annotations

import dataclasses
import io
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
from aiokafka.partitioner import murmur2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from roundlog.arrays import NamedArrays, raw_chunks, sha256_of, specs_of
from roundlog.bus import partition_for
from roundlog.codec import HEADER_SIZE, encode, schema_json
from roundlog.domain.authority import KEY_HEADER, SIGNATURE_HEADER, SIGNING_CONTEXT
from roundlog.domain.events import (
    ClientHeartbeat,
    ClientRole,
    ClientsAssigned,
    Event,
    KeyRegistered,
    KeyRevoked,
    KeyRole,
    ModelImported,
    ModelStaged,
    PredictionReceived,
    RoundAggregated,
    RoundConfig,
    RoundFailed,
    RoundRequested,
    RoundTimedOut,
    SessionFinished,
    SessionStarted,
    ShardAggregated,
    Task,
    TensorRef,
    UpdateReceived,
    UpdateRejected,
    ValidationReceived,
    answer_event_id,
    derived_id,
    partition_key,
    update_id_for,
)
from roundlog.keys import Signer, key_id_of

VECTORS = Path(__file__).resolve().parents[2] / "services" / "roundlog" / "schemas" / "vectors"

#: A fixed Ed25519 seed: the key of the signature vector (never a real deployment's).
SIGNING_SEED = bytes(range(32))
#: Bytes per chunk in the tensors vector: small, so one model makes several chunks, one of
#: them spanning two arrays. roundlog writes chunks of up to 1 MiB.
VECTOR_CHUNK_BYTES = 16
PARTITION_COUNTS = (6, 12)

AT = datetime(2026, 12, 1, 9, 30, 15, 250000, tzinfo=UTC)
DEADLINE = datetime(2026, 12, 1, 9, 33, 15, 250000, tzinfo=UTC)
SESSION = "6f1c2a9e-3b7d-4c55-9a0e-1d2f3b4c5d6e"
ROUND = derived_id(SESSION, "round", "1")
CLIENT = "client-7"
MODEL = derived_id("model", "0" * 64)


def vector_model() -> NamedArrays:
    """Arrays of several dtypes and shapes, a scalar and an empty one included."""
    return [
        ("dense/kernel", np.array([[0.5, -1.25, 2.0], [3.5, 0.0, -0.125]], dtype=np.float32)),
        ("dense/bias", np.array([1.0, -2.0, 0.25], dtype=np.float64)),
        ("steps", np.array(7, dtype=np.int64)),
        ("mask", np.array([1, 0, 255], dtype=np.uint8)),
        ("empty", np.zeros((0, 4), dtype=np.float32)),
    ]


def tensor_ref(key: str, first_offset: int = 0) -> TensorRef:
    """Where ``vector_model`` would land written from ``first_offset`` on, in vector-sized chunks."""
    arrays = vector_model()
    chunks = list(raw_chunks(arrays, VECTOR_CHUNK_BYTES))
    return TensorRef(
        key=key,
        partition=partition_for(key, PARTITION_COUNTS[0]),
        first_offset=first_offset,
        last_offset=first_offset + len(chunks) - 1,
        chunks=len(chunks),
        nbytes=sum(len(c) for c in chunks),
        sha256=sha256_of(arrays),
        arrays=specs_of(arrays),
    )


def sample_events() -> list[Event]:
    """One event of each type, every field set to something other than its default."""
    config = RoundConfig(
        round_timeout=30.5,
        buffer_size=4,
        clients_required=2,
        max_clients=8,
        min_updates=2,
        aggregator="fedadam",
        aggregator_kwargs='{"eta": 0.1}',
        max_num_examples=50000,
        max_weight_share=0.75,
        shards=2,
    )
    model = tensor_ref(MODEL)
    update_id = update_id_for(ROUND, CLIENT)
    next_model = derived_id(ROUND, "model")
    key_id = key_id_of(Ed25519PrivateKey.from_private_bytes(SIGNING_SEED))
    ids = {"occurred_at": AT, "session_id": SESSION, "round_id": ROUND}
    return [
        ModelImported(
            event_id=derived_id(MODEL, "imported"), occurred_at=AT, model_id=MODEL, name="seed", tensor=model
        ),
        SessionStarted(
            event_id=derived_id(SESSION, "started"),
            occurred_at=AT,
            session_id=SESSION,
            name="vectors",
            rounds=3,
            initial_model_id=MODEL,
            initial_model=model,
            round_config=config,
            validate_each_round=True,
            stop_on_failure=False,
        ),
        RoundRequested(
            event_id=derived_id(ROUND, "requested"),
            round_no=1,
            task=Task.TRAINING,
            model_id=MODEL,
            config=config,
            **ids,
        ),
        ModelStaged(
            event_id=derived_id(ROUND, "staged"),
            model_id=MODEL,
            sha256=model.sha256,
            nbytes=model.nbytes,
            **ids,
        ),
        ClientsAssigned(
            event_id=derived_id(ROUND, "assigned"),
            client_ids=(CLIENT, "client-9"),
            deadline=DEADLINE,
            task=Task.TRAINING,
            model_id=MODEL,
            model=model,
            config=config,
            **ids,
        ),
        UpdateReceived(
            event_id=answer_event_id(ROUND, CLIENT, Task.TRAINING),
            client_id=CLIENT,
            update_id=update_id,
            num_examples=640,
            metrics={"loss": 0.375, "accuracy": 0.8125},
            tensor=tensor_ref(update_id, first_offset=12),
            base_model_sha256=model.sha256,
            **ids,
        ),
        UpdateRejected(
            event_id=derived_id(ROUND, "rejected", update_id),
            client_id=CLIENT,
            update_id=update_id,
            reason="non_finite",
            detail="dense/bias holds NaN",
            **ids,
        ),
        ValidationReceived(
            event_id=answer_event_id(ROUND, CLIENT, Task.VALIDATION),
            client_id=CLIENT,
            model_id=MODEL,
            num_examples=200,
            metrics={"accuracy": 0.5, "loss": 1.5},
            model_sha256=model.sha256,
            **ids,
        ),
        PredictionReceived(
            event_id=answer_event_id(ROUND, CLIENT, Task.INFERENCE),
            client_id=CLIENT,
            model_id=MODEL,
            summary="3 classes, 120 predictions",
            metrics={"positives": 42.0},
            model_sha256=model.sha256,
            **ids,
        ),
        RoundTimedOut(event_id=derived_id(ROUND, "timed_out"), deadline=DEADLINE, **ids),
        RoundAggregated(
            event_id=derived_id(ROUND, "aggregated"),
            model_id=next_model,
            parent_model_id=MODEL,
            tensor=tensor_ref(next_model, first_offset=40),
            optimizer_state=tensor_ref(derived_id(next_model, "state"), first_offset=60),
            update_ids=(update_id,),
            total_weight=640.0,
            time_model_load=0.5,
            time_aggregation=0.0625,
            **ids,
        ),
        ShardAggregated(
            event_id=derived_id(ROUND, "shard", "1"),
            shard=1,
            shards=2,
            update_ids=(update_id,),
            total_weight=640.0,
            partial=tensor_ref(derived_id(ROUND, "shard", "1"), first_offset=80),
            **ids,
        ),
        RoundFailed(
            event_id=derived_id(ROUND, "failed"), reason="too_few_updates", detail="1 of 2 updates", **ids
        ),
        SessionFinished(
            event_id=derived_id(SESSION, "finished"),
            occurred_at=AT,
            session_id=SESSION,
            succeeded=True,
            reason="all rounds done",
            final_model_id=next_model,
        ),
        ClientHeartbeat(
            event_id="0b7e1c3a-8d2f-4e6a-9c1b-5f4e3d2c1b0a",
            occurred_at=AT,
            client_id=CLIENT,
            roles=(ClientRole.TRAINER, ClientRole.VALIDATOR),
            labels={"site": "lund", "gpu": "none"},
        ),
        KeyRegistered(
            event_id="1c8f2d4b-9e3a-4f7b-8d2c-6a5f4e3d2c1b",
            occurred_at=AT,
            key_id=key_id,
            roles=(KeyRole.CLIENT,),
            client_id=CLIENT,
            name="client-7 laptop",
        ),
        KeyRevoked(
            event_id="2d9a3e5c-af4b-4a8c-9e3d-7b6a5f4e3d2c", occurred_at=AT, key_id=key_id, reason="lost"
        ),
    ]


def avro_json(event: Event, body: bytes) -> Any:
    """The event as Avro's JSON encoding (the spec's, unions wrapped), from its binary body."""
    schema = fastavro.parse_schema(schema_json(type(event)))
    record = fastavro.schemaless_reader(io.BytesIO(body), schema, None)
    out = io.StringIO()
    fastavro.json_writer(out, schema, [record])
    return json.loads(out.getvalue())


def event_vectors() -> dict[str, Any]:
    cases = []
    for event in sample_events():
        data = encode(event)
        cases.append(
            {
                "type": type(event).__name__,
                "schema": f"{type(event).__name__}.avsc",
                "fingerprint": data[2:HEADER_SIZE].hex(),
                "partition_key": partition_key(event),
                "avro_json": avro_json(event, data[HEADER_SIZE:]),
                "single_object": data.hex(),
            }
        )
    return {
        "about": "One event of each type: its Avro JSON encoding and its exact single-object bytes "
        "(c3 01, the CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form in little-endian "
        "order, the binary body). Decoding `single_object` must give `avro_json`; encoding it must "
        "give `single_object` byte for byte.",
        "events": cases,
    }


def signature_vectors() -> dict[str, Any]:
    private = Ed25519PrivateKey.from_private_bytes(SIGNING_SEED)
    signer = Signer(private, key_id_of(private))
    cases = []
    for event in sample_events()[4:6]:  # an assignment and an update: what clients read and write
        value = encode(event)
        headers = dict(signer.headers(value))
        cases.append(
            {
                "type": type(event).__name__,
                "value": value.hex(),
                "signed_message": (SIGNING_CONTEXT + signer.key_id.encode() + b"\n" + value).hex(),
                "headers": {
                    KEY_HEADER: headers[KEY_HEADER].decode("ascii"),
                    SIGNATURE_HEADER: headers[SIGNATURE_HEADER].hex(),
                },
            }
        )
    return {
        "about": "Ed25519 (RFC 8032, deterministic) over the context, the key id and the record value: "
        "message = context + key_id (ASCII) + 0x0a + value. The key id is the raw 32-byte public key "
        "in lowercase hex; the headers carry it (ASCII) and the 64-byte signature (raw bytes, hex here).",
        "private_key_seed": SIGNING_SEED.hex(),
        "key_id": signer.key_id,
        "context": SIGNING_CONTEXT.decode("ascii"),
        "key_header": KEY_HEADER,
        "signature_header": SIGNATURE_HEADER,
        "cases": cases,
    }


def tensor_vectors() -> dict[str, Any]:
    arrays = vector_model()
    key = update_id_for(ROUND, CLIENT)
    ref = tensor_ref(key)
    stream = b"".join(bytes(c) for c in raw_chunks(arrays, 1 << 30))
    return {
        "about": "A model as the tensors topic carries it: each array's raw little-endian C-order bytes, "
        "concatenated in order, cut into records of at most chunk_bytes (1 MiB in roundlog; "
        f"{VECTOR_CHUNK_BYTES} here). Every record of a blob is keyed by TensorRef.key, sits on one "
        "partition and carries its sequence number (from 0, decimal ASCII) in the roundlog-chunk "
        "header. sha256 is over the whole stream. `tensor_ref` is the reference for the chunks "
        "written from offset 0 of an empty partition.",
        "chunk_bytes": VECTOR_CHUNK_BYTES,
        "arrays": [
            {
                "name": name,
                "dtype": spec.dtype,
                "shape": list(spec.shape),
                "values": array.reshape(-1).tolist(),
            }
            for (name, array), spec in zip(arrays, specs_of(arrays), strict=True)
        ],
        "stream": stream.hex(),
        "sha256": sha256_of(arrays),
        "records": [
            {"key": key, "headers": {"roundlog-chunk": str(seq)}, "value": bytes(chunk).hex()}
            for seq, chunk in enumerate(raw_chunks(arrays, VECTOR_CHUNK_BYTES))
        ],
        "tensor_ref": _ref_json(ref),
        "dtypes": {
            "about": "Spellings of one dtype: numpy's type string (what roundlog writes), "
            "the same without its byte-order mark, and its name. Bytes are little-endian whatever the "
            "spelling; big-endian ('>f4') is refused.",
            "same": [
                ["<f4", "f4", "float32"],
                ["<f8", "f8", "float64"],
                ["<i8", "i8", "int64"],
                ["|u1", "u1", "uint8"],
            ],
            "refused": [">f4", "float", "double", "torch.float32", ""],
        },
    }


def _ref_json(ref: TensorRef) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(ref)))  # tuples as JSON lists


def id_vectors() -> dict[str, Any]:
    rounds = [derived_id(SESSION, "round", str(n)) for n in (1, 2)]
    clients = [CLIENT, "trainer-java-0", "trainer-ts-0", "ünïcode-client"]
    return {
        "about": "Ids a client derives: UUIDv5 (RFC 4122) in the namespace uuid5(NAMESPACE_URL, "
        "'roundlog.v1') of the parts joined by '/'. An update's id (also its tensors key) is "
        "derived(round_id, 'client', client_id, 'update'); a client's answer's event id is "
        "derived(round_id, 'client', client_id, task).",
        "namespace": str(uuid.uuid5(uuid.NAMESPACE_URL, "roundlog.v1")),
        "derived": [
            {"parts": parts, "id": derived_id(*parts)}
            for parts in (["model", "0" * 64], [SESSION, "started"], ["a", "b/c", ""])
        ],
        "answers": [
            {
                "round_id": round_id,
                "client_id": client,
                "update_id": update_id_for(round_id, client),
                "event_ids": {task.value: answer_event_id(round_id, client, task) for task in Task},
            }
            for round_id in rounds
            for client in clients
        ],
    }


def partition_vectors() -> dict[str, Any]:
    sessions = [str(uuid.uuid5(uuid.NAMESPACE_DNS, f"session-{n}.roundlog.test")) for n in range(24)]
    others = ["", "a", "ab", "abc", "abcd", "client-7", "ünïcode-client"]
    return {
        "about": "Kafka's default partitioner for keyed records (Java's): murmur2 (seed 0x9747b28c) of "
        "the key's UTF-8 bytes, as a signed 32-bit int; partition = (murmur2 & 0x7fffffff) mod count. "
        "librdkafka's default (consistent_random, CRC32) and others differ: state the partition.",
        "counts": list(PARTITION_COUNTS),
        "keys": [
            {
                "key": key,
                "murmur2": _signed(key),
                "partitions": {str(n): partition_for(key, n) for n in PARTITION_COUNTS},
            }
            for key in sessions + others
        ],
    }


def _signed(key: str) -> int:
    value: int = murmur2(key.encode())
    return value - (1 << 32) if value >= 1 << 31 else value


FILES = {
    "events.json": event_vectors,
    "signatures.json": signature_vectors,
    "tensors.json": tensor_vectors,
    "ids.json": id_vectors,
    "partitions.json": partition_vectors,
}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    VECTORS.mkdir(exist_ok=True)
    for name, build in FILES.items():
        (VECTORS / name).write_text(render(build), encoding="utf-8")
        print(f"wrote {VECTORS / name}")


if __name__ == "__main__":
    main()
