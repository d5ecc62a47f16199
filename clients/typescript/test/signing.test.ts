import assert from "node:assert/strict";
import { generateKeyPairSync } from "node:crypto";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import { KEY_HEADER, SIGNATURE_HEADER, Signer, signatureProblem, signedMessage } from "../src/signing.js";
import { hex, vectors } from "./vectors.js";

const data = vectors("signatures.json") as {
  private_key_seed: string;
  key_id: string;
  context: string;
  key_header: string;
  signature_header: string;
  cases: { type: string; value: string; signed_message: string; headers: Record<string, string> }[];
};

describe("signing against signatures.json", () => {
  const signer = Signer.fromSeed(hex(data.private_key_seed));

  it("key id and header names", () => {
    assert.equal(signer.keyId, data.key_id);
    assert.equal(KEY_HEADER, data.key_header);
    assert.equal(SIGNATURE_HEADER, data.signature_header);
  });

  for (const c of data.cases) {
    it(`${c.type}: message, signature, headers, verification`, () => {
      const value = hex(c.value);
      assert.equal(signedMessage(signer.keyId, value).toString("hex"), c.signed_message);
      const headers = signer.headers(value);
      assert.equal(headers[KEY_HEADER]!.toString("ascii"), c.headers[KEY_HEADER]);
      assert.equal(headers[SIGNATURE_HEADER]!.toString("hex"), c.headers[SIGNATURE_HEADER]);
      assert.equal(signatureProblem(headers, value), undefined);
      const tampered = Buffer.from(value);
      tampered[tampered.length - 1] = tampered[tampered.length - 1]! ^ 1;
      assert.match(signatureProblem(headers, tampered)!, /does not verify/);
      assert.match(signatureProblem(undefined, value)!, /no roundlog-key/);
    });
  }

  it("loads a PKCS#8 PEM key file and derives the same key id as its public key", () => {
    const { privateKey, publicKey } = generateKeyPairSync("ed25519");
    const dir = mkdtempSync(join(tmpdir(), "roundlog-ts-"));
    const path = join(dir, "client.pem");
    writeFileSync(path, privateKey.export({ type: "pkcs8", format: "pem" }), { mode: 0o600 });
    const loaded = Signer.fromFile(path);
    const raw = publicKey.export({ type: "spki", format: "der" }).subarray(-32).toString("hex");
    assert.equal(loaded.keyId, raw);
    assert.equal(signatureProblem(loaded.headers(Buffer.from("x")), Buffer.from("x")), undefined);
  });
});
