import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, it } from "node:test";
import avro from "avsc";
import { MAGIC, SchemaCatalog, catalog, decode, encode, fingerprintBytes, rabinFingerprint, schemasDir } from "../src/codec.js";
import { hex, vectors } from "./vectors.js";

interface EventVector {
  type: string;
  schema: string;
  fingerprint: string;
  partition_key: string;
  avro_json: Record<string, unknown>;
  single_object: string;
}
const events = vectors("events.json").events as EventVector[];

describe("codec against events.json", () => {
  it("covers every current schema", () => {
    assert.deepEqual(new Set(events.map((e) => e.type)), new Set(catalog().names()));
  });

  for (const e of events) {
    describe(e.type, () => {
      it("fingerprint of the Parsing Canonical Form", () => {
        assert.equal(fingerprintBytes(catalog().type(e.type)).toString("hex"), e.fingerprint);
        assert.equal(e.single_object.slice(4, 20), e.fingerprint);
      });
      it("decodes single_object to avro_json", () => {
        const decoded = decode(hex(e.single_object));
        assert.ok(decoded, "known fingerprint");
        assert.equal(decoded.type, e.type);
        assert.deepEqual(catalog().toAvroJson(e.type, decoded.value), e.avro_json);
      });
      it("encodes avro_json to the exact single_object bytes", () => {
        const value = catalog().fromAvroJson(e.type, e.avro_json);
        assert.equal(encode(e.type, value).toString("hex"), e.single_object);
      });
      it("re-encodes its decoding byte for byte", () => {
        const decoded = decode(hex(e.single_object));
        assert.equal(encode(e.type, decoded!.value).toString("hex"), e.single_object);
      });
      it("partition key is the one the client uses", () => {
        const v = e.avro_json;
        if (e.type === "ClientHeartbeat") assert.equal(e.partition_key, v.client_id);
        else if ("session_id" in v) assert.equal(e.partition_key, v.session_id);
      });
    });
  }
});

describe("codec", () => {
  it("skips an unknown fingerprint", () => {
    const bytes = hex(events[0]!.single_object);
    bytes[2] = bytes[2]! ^ 0xff;
    assert.equal(decode(bytes), undefined);
  });

  it("refuses bytes without the single-object marker", () => {
    assert.throws(() => decode(Buffer.from("0001020304050607080910", "hex")));
  });

  it("refuses to encode a value that does not fit", () => {
    assert.throws(() => encode("ClientHeartbeat", { event_id: "x" }), /does not fit/);
  });

  it("Rabin fingerprint of the empty string is the CRC-64-AVRO EMPTY constant", () => {
    assert.equal(rabinFingerprint(new Uint8Array(0)), 0xc15d213aa4d7a795n);
  });

  it("resolves every released older schema into the current one", () => {
    const root = schemasDir();
    const historyDir = join(root, "history");
    const heartbeatV1 = avro.Type.forSchema(
      JSON.parse(readFileSync(join(historyDir, "ClientHeartbeat", "v1.avsc"), "utf8")) as avro.Schema,
    );
    const old = { event_id: "0b7e1c3a-8d2f-4e6a-9c1b-5f4e3d2c1b0a", occurred_at: 1796117415250, client_id: "c", roles: ["trainer"] };
    const bytes = Buffer.concat([MAGIC, fingerprintBytes(heartbeatV1), heartbeatV1.toBuffer(old)]);
    const decoded = decode(bytes);
    assert.equal(decoded?.type, "ClientHeartbeat");
    assert.deepEqual(catalog().toAvroJson("ClientHeartbeat", decoded!.value), { ...old, labels: {} });
  });

  it("loads from ROUNDLOG_SCHEMAS_DIR", () => {
    const fromEnv = new SchemaCatalog(schemasDir({ ROUNDLOG_SCHEMAS_DIR: schemasDir() }));
    assert.deepEqual(fromEnv.names(), catalog().names());
  });
});
