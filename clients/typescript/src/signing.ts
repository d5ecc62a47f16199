/**
 * Ed25519 signatures on event records (roundlog.keys / roundlog.domain.authority).
 *
 * A key file is an unencrypted PKCS#8 PEM Ed25519 private key. Its key id is the raw 32-byte
 * public key in lowercase hex. A signed record carries two headers: `roundlog-key` (the key id,
 * ASCII) and `roundlog-signature` (64 raw bytes) over
 * `"roundlog.v1 event\n" + key id + "\n" + record value`.
 */

import { createPrivateKey, createPublicKey, sign, verify, type KeyObject } from "node:crypto";
import { readFileSync } from "node:fs";
import { ConfigError } from "./settings.js";

export const SIGNING_CONTEXT = Buffer.from("roundlog.v1 event\n", "ascii");
export const KEY_HEADER = "roundlog-key";
export const SIGNATURE_HEADER = "roundlog-signature";

/** DER prefixes of an Ed25519 SubjectPublicKeyInfo and PKCS#8 private key (RFC 8410). */
const SPKI_PREFIX = Buffer.from("302a300506032b6570032100", "hex");
const PKCS8_PREFIX = Buffer.from("302e020100300506032b657004220420", "hex");
const KEY_ID = /^[0-9a-fA-F]{64}$/;

/** The bytes a key signs for a record whose value is `value`. */
export function signedMessage(keyId: string, value: Uint8Array): Buffer {
  return Buffer.concat([SIGNING_CONTEXT, Buffer.from(keyId, "ascii"), Buffer.from("\n"), value]);
}

/** The key id (raw public key, lowercase hex) of an Ed25519 private key. */
export function keyIdOf(privateKey: KeyObject): string {
  const spki = createPublicKey(privateKey).export({ type: "spki", format: "der" });
  return spki.subarray(spki.length - 32).toString("hex");
}

/** Signs record values as one key. */
export class Signer {
  readonly keyId: string;

  constructor(private readonly privateKey: KeyObject) {
    if (privateKey.asymmetricKeyType !== "ed25519") {
      throw new ConfigError(`the key is ${privateKey.asymmetricKeyType ?? "not asymmetric"}, not Ed25519`);
    }
    this.keyId = keyIdOf(privateKey);
  }

  /** The signer of a PEM key file (ROUNDLOG_KEY_FILE). */
  static fromFile(path: string): Signer {
    let pem: Buffer;
    try {
      pem = readFileSync(path);
    } catch (error) {
      throw new ConfigError(`ROUNDLOG_KEY_FILE ${path}: ${(error as Error).message}`);
    }
    try {
      return new Signer(createPrivateKey(pem));
    } catch (error) {
      if (error instanceof ConfigError) throw new ConfigError(`ROUNDLOG_KEY_FILE ${path}: ${error.message}`);
      throw new ConfigError(`ROUNDLOG_KEY_FILE ${path} is not an unencrypted PEM private key: ${(error as Error).message}`);
    }
  }

  /** The signer of a raw 32-byte Ed25519 seed (tests). */
  static fromSeed(seed: Uint8Array): Signer {
    if (seed.length !== 32) throw new Error("an Ed25519 seed is 32 bytes");
    const der = Buffer.concat([PKCS8_PREFIX, seed]);
    return new Signer(createPrivateKey({ key: der, format: "der", type: "pkcs8" }));
  }

  /** The 64-byte signature over `value`'s signed message. */
  signature(value: Uint8Array): Buffer {
    return sign(null, signedMessage(this.keyId, value), this.privateKey);
  }

  /** The headers that sign a record whose value is `value`. */
  headers(value: Uint8Array): Record<string, Buffer> {
    return {
      [KEY_HEADER]: Buffer.from(this.keyId, "ascii"),
      [SIGNATURE_HEADER]: this.signature(value),
    };
  }
}

/** A header value as kafkajs hands it over (Buffer, string, or a list when repeated). */
type HeaderValue = Buffer | string | (Buffer | string)[] | undefined;

function headerBytes(value: HeaderValue): Buffer | undefined {
  const last = Array.isArray(value) ? value[value.length - 1] : value;
  if (last === undefined) return undefined;
  return typeof last === "string" ? Buffer.from(last, "utf8") : last;
}

/**
 * Why a record's signature does not hold, or undefined when it does. Needs no registry: the key
 * id in the headers is the public key, and the signature must verify with it.
 */
export function signatureProblem(
  headers: Record<string, HeaderValue> | undefined,
  value: Uint8Array,
): string | undefined {
  const key = headerBytes(headers?.[KEY_HEADER]);
  const signature = headerBytes(headers?.[SIGNATURE_HEADER]);
  if (key === undefined || signature === undefined) return "no roundlog-key and roundlog-signature headers";
  const keyId = key.toString("ascii");
  if (!KEY_ID.test(keyId)) return "the key id is not 64 hex digits";
  try {
    const publicKey = createPublicKey({
      key: Buffer.concat([SPKI_PREFIX, Buffer.from(keyId, "hex")]),
      format: "der",
      type: "spki",
    });
    if (verify(null, signedMessage(keyId, value), publicKey, signature)) return undefined;
  } catch {
    // a malformed key or signature: fall through
  }
  return `the signature does not verify with key ${keyId}`;
}
