/**
 * Avro single-object encoding of roundlog events, by event name.
 *
 * Wire format: C3 01, the 8-byte little-endian CRC-64-AVRO (Rabin) fingerprint of the writer
 * schema's Parsing Canonical Form, then the Avro binary body. Every current schema
 * (schemas/<Event>.avsc) and every released older one (schemas/history/<Event>/v<N>.avsc) is
 * loaded; old writers are resolved into the current reader schema. A record whose fingerprint is
 * unknown (another event type, a future version) decodes to `undefined`.
 *
 * The schemas are read at run time from the repository's schemas/ folder, found from this package
 * (../../schemas relative to clients/typescript) or from ROUNDLOG_SCHEMAS_DIR.
 */

import avro from "avsc";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const MAGIC = Buffer.from([0xc3, 0x01]);
export const HEADER_SIZE = MAGIC.length + 8;
export const NAMESPACE = "roundlog.v1";

// --- CRC-64-AVRO ---------------------------------------------------------------------------------

const EMPTY64 = 0xc15d213aa4d7a795n;
const FP_TABLE: bigint[] = Array.from({ length: 256 }, (_, i) => {
  let fp = BigInt(i);
  for (let j = 0; j < 8; j++) fp = (fp >> 1n) ^ (EMPTY64 & -(fp & 1n));
  return fp;
});

/** The CRC-64-AVRO (Rabin) fingerprint of `data`, as the Avro specification defines it. */
export function rabinFingerprint(data: Uint8Array): bigint {
  let fp = EMPTY64;
  for (const byte of data) fp = (fp >> 8n) ^ FP_TABLE[Number((fp ^ BigInt(byte)) & 0xffn)]!;
  return fp;
}

/**
 * The Parsing Canonical Form of a parsed type. In avsc 5.7, `type.schema()` (alias `getSchema()`)
 * with no options is the canonical form (full names, no docs/defaults/logical types, named types
 * spelled out at their first use). `type.toString()` is not: for a record it is only the
 * record's name (noDeref). The tests pin this against the fingerprints in the vectors.
 */
export function canonicalForm(type: avro.Type): string {
  return JSON.stringify(type.schema());
}

/** The 8 fingerprint bytes of a schema as single-object encoding carries them (little-endian). */
export function fingerprintBytes(type: avro.Type): Buffer {
  const out = Buffer.alloc(8);
  out.writeBigUInt64LE(rabinFingerprint(Buffer.from(canonicalForm(type), "utf8")));
  return out;
}

// --- schema loading ------------------------------------------------------------------------------

/** The schemas folder: ROUNDLOG_SCHEMAS_DIR, else ../../schemas from this package's root. */
export function schemasDir(env: NodeJS.ProcessEnv = process.env): string {
  const override = env.ROUNDLOG_SCHEMAS_DIR?.trim();
  if (override) return resolve(override);
  return resolve(packageRoot(), "..", "..", "schemas");
}

/** The folder holding this package's package.json (works from dist/ and from the test build). */
function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const manifest = join(dir, "package.json");
    if (existsSync(manifest)) {
      const name = (JSON.parse(readFileSync(manifest, "utf8")) as { name?: string }).name;
      if (name === "roundlog-client") return dir;
    }
    const parent = dirname(dir);
    if (parent === dir) throw new Error("cannot find the roundlog-client package root");
    dir = parent;
  }
}

interface Reader {
  readonly name: string;
  readonly writer: avro.Type;
  /** The current type, and the resolver from this writer into it (absent for the current schema). */
  readonly reader: avro.Type;
  readonly resolver: ReturnType<avro.Type["createResolver"]> | undefined;
}

/** A decoded event: its type name and its value, shaped by the current schema. */
export interface Decoded {
  readonly type: string;
  readonly value: any; // eslint-disable-line @typescript-eslint/no-explicit-any -- shaped by the schema
}

function parse(path: string, name: string): avro.Type {
  const schema = JSON.parse(readFileSync(path, "utf8")) as { name?: string; namespace?: string };
  if (schema.name !== name || schema.namespace !== NAMESPACE) {
    throw new Error(`${path}: expected record ${NAMESPACE}.${name}`);
  }
  // Unions are ["null", TensorRef] only: unwrapped, a value is null or the record itself.
  return avro.Type.forSchema(schema as avro.Schema, { wrapUnions: false });
}

/** Every schema of every event, parsed once: event name → current writer, fingerprint → reader. */
export class SchemaCatalog {
  private readonly current = new Map<string, { type: avro.Type; header: Buffer }>();
  private readonly readers = new Map<string, Reader>(); // key: fingerprint hex

  constructor(dir: string = schemasDir()) {
    const files = readdirSync(dir).filter((f) => f.endsWith(".avsc"));
    if (files.length === 0) throw new Error(`no .avsc schemas in ${dir} (set ROUNDLOG_SCHEMAS_DIR)`);
    for (const file of files.sort()) {
      const name = file.slice(0, -".avsc".length);
      const type = parse(join(dir, file), name);
      const fp = fingerprintBytes(type);
      this.current.set(name, { type, header: Buffer.concat([MAGIC, fp]) });
      this.readers.set(fp.toString("hex"), { name, writer: type, reader: type, resolver: undefined });
      const history = join(dir, "history", name);
      if (!existsSync(history)) continue;
      for (const old of readdirSync(history).filter((f) => f.endsWith(".avsc")).sort()) {
        const writer = parse(join(history, old), name);
        const key = fingerprintBytes(writer).toString("hex");
        if (!this.readers.has(key)) {
          this.readers.set(key, { name, writer, reader: type, resolver: type.createResolver(writer) });
        }
      }
    }
  }

  /** The event names with a current schema. */
  names(): string[] {
    return [...this.current.keys()];
  }

  /** The current avsc type of an event. */
  type(name: string): avro.Type {
    const entry = this.current.get(name);
    if (entry === undefined) throw new Error(`unknown event type ${name}`);
    return entry.type;
  }

  /** Single-object encoding of `value` with the current schema of `name`; throws if it does not fit. */
  encode(name: string, value: unknown): Buffer {
    const entry = this.current.get(name);
    if (entry === undefined) throw new Error(`unknown event type ${name}`);
    const problems: string[] = [];
    const valid = entry.type.isValid(value, {
      errorHook: (path: string[], v: unknown) => problems.push(`${path.join(".") || "(root)"}=${String(v)}`),
    });
    if (!valid) throw new Error(`${name} does not fit its schema: ${problems.join(", ")}`);
    return Buffer.concat([entry.header, entry.type.toBuffer(value)]);
  }

  /**
   * The event in `data`, or undefined when the fingerprint is unknown. Bytes that are not a
   * single-object encoding, or a body that does not parse, throw.
   */
  decode(data: Uint8Array): Decoded | undefined {
    const buf = Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    if (buf.length < HEADER_SIZE || buf[0] !== MAGIC[0] || buf[1] !== MAGIC[1]) {
      throw new Error("not an Avro single-object encoding (no C3 01 header)");
    }
    const reader = this.readers.get(buf.subarray(2, HEADER_SIZE).toString("hex"));
    if (reader === undefined) return undefined;
    const body = buf.subarray(HEADER_SIZE);
    const value: unknown =
      reader.resolver === undefined ? reader.reader.fromBuffer(body) : reader.reader.fromBuffer(body, reader.resolver);
    return { type: reader.name, value };
  }

  /** A value of `name` as Avro's JSON encoding (unions wrapped as {"roundlog.v1.TensorRef": ...}). */
  toAvroJson(name: string, value: unknown): unknown {
    return JSON.parse(this.type(name).toString(value));
  }

  /** A value of `name` from Avro's JSON encoding. */
  fromAvroJson(name: string, json: unknown): unknown {
    return this.type(name).fromString(JSON.stringify(json));
  }
}

let defaultCatalog: SchemaCatalog | undefined;

/** The catalog of schemasDir(), loaded on first use. */
export function catalog(): SchemaCatalog {
  defaultCatalog ??= new SchemaCatalog();
  return defaultCatalog;
}

/** Single-object encoding of event `name` with its current schema. */
export function encode(name: string, value: unknown): Buffer {
  return catalog().encode(name, value);
}

/** The event in `data` (type name and value), or undefined for an unknown fingerprint. */
export function decode(data: Uint8Array): Decoded | undefined {
  return catalog().decode(data);
}
