/**
 * Arrays over the tensors topic (roundlog.arrays / roundlog.tensors).
 *
 * A blob (a model or an update) is each array's raw little-endian C-order bytes, concatenated in
 * order, cut into records of at most 1 MiB. Every record is keyed by the blob's key, sits on one
 * partition and carries its sequence number (from 0, decimal ASCII) in the `roundlog-chunk`
 * header. A TensorRef says where the records lie; the reader keeps the records with the blob's
 * key between its first and last offset (other blobs may interleave), checks the sequence, the
 * count, the byte total and the sha256, and rebuilds the arrays.
 */

import { createHash } from "node:crypto";
import { endianness } from "node:os";
import type { Batch } from "kafkajs";
import type { Bus, Follower } from "./bus.js";
import type { ArraySpec, TensorRef } from "./events.js";

/** The most payload bytes one tensors record may carry. */
export const MAX_CHUNK_BYTES = 1 << 20;
/** The largest blob the contract allows (roundlog.domain.validation.MAX_TENSOR_BYTES). */
export const MAX_TENSOR_BYTES = 2 ** 36;
export const SEQ_HEADER = "roundlog-chunk";

if (endianness() !== "LE") {
  // Typed arrays use the host's byte order; the wire is little-endian.
  throw new Error("roundlog-client needs a little-endian host");
}

export type TypedArray =
  | Float32Array
  | Float64Array
  | Int8Array
  | Int16Array
  | Int32Array
  | BigInt64Array
  | Uint8Array
  | Uint16Array
  | Uint32Array
  | BigUint64Array;

/** One named array of a model. `data` holds the elements in C order (see DTYPES for each type's view). */
export interface NamedArray {
  name: string;
  /** The canonical numpy type string, e.g. "<f4". */
  dtype: string;
  shape: number[];
  data: TypedArray;
}

interface Dtype {
  /** numpy's type string: what roundlog writes. */
  readonly typestr: string;
  /** numpy's name, e.g. float32. */
  readonly name: string;
  readonly itemsize: number;
  /** Numbers of the typed array per element: 2 for complex (real, imaginary), else 1. */
  readonly lanes: number;
  readonly view: (buffer: ArrayBuffer, byteOffset: number, length: number) => TypedArray;
  /** Float arrays (<f4, <f8) are the ones the deterministic trainer shifts. */
  readonly float: boolean;
}

function dt(
  typestr: string,
  name: string,
  itemsize: number,
  view: Dtype["view"],
  lanes = 1,
  float = false,
): Dtype {
  return { typestr, name, itemsize, lanes, view, float };
}

/**
 * The number types a stream may carry. float16 has no JavaScript array type: its elements are
 * kept as raw 16-bit patterns (Uint16Array); complex numbers as interleaved (real, imaginary).
 */
export const DTYPES: readonly Dtype[] = [
  dt("|b1", "bool", 1, (b, o, n) => new Uint8Array(b, o, n)),
  dt("|i1", "int8", 1, (b, o, n) => new Int8Array(b, o, n)),
  dt("<i2", "int16", 2, (b, o, n) => new Int16Array(b, o, n)),
  dt("<i4", "int32", 4, (b, o, n) => new Int32Array(b, o, n)),
  dt("<i8", "int64", 8, (b, o, n) => new BigInt64Array(b, o, n)),
  dt("|u1", "uint8", 1, (b, o, n) => new Uint8Array(b, o, n)),
  dt("<u2", "uint16", 2, (b, o, n) => new Uint16Array(b, o, n)),
  dt("<u4", "uint32", 4, (b, o, n) => new Uint32Array(b, o, n)),
  dt("<u8", "uint64", 8, (b, o, n) => new BigUint64Array(b, o, n)),
  dt("<f2", "float16", 2, (b, o, n) => new Uint16Array(b, o, n)),
  dt("<f4", "float32", 4, (b, o, n) => new Float32Array(b, o, n), 1, true),
  dt("<f8", "float64", 8, (b, o, n) => new Float64Array(b, o, n), 1, true),
  dt("<c8", "complex64", 8, (b, o, n) => new Float32Array(b, o, n), 2),
  dt("<c16", "complex128", 16, (b, o, n) => new Float64Array(b, o, n), 2),
];

/** Each dtype answers to its type string, the string without its byte-order mark, and its name. */
const SPELLINGS = new Map<string, Dtype>(
  DTYPES.flatMap((d) => [
    [d.typestr, d],
    [d.typestr.slice(1), d],
    [d.name, d],
  ]),
);

export type StreamErrorReason = "incomplete" | "overflow" | "hash_mismatch" | "dtype_mismatch" | "shape_mismatch";

/** Why a stream of arrays cannot be used; `reason` is stable, the message is for people. */
export class StreamError extends Error {
  override name = "StreamError";
  constructor(
    readonly reason: StreamErrorReason,
    detail: string,
  ) {
    super(`${reason}: ${detail}`);
  }
}

/** The dtype a spelling names ("<f4", "f4" and "float32" are one); big-endian and others are refused. */
export function wireDtype(spelling: string): Dtype {
  const found = SPELLINGS.get(spelling);
  if (found === undefined) {
    throw new StreamError("dtype_mismatch", `unknown dtype ${JSON.stringify(spelling)}`);
  }
  return found;
}

function elementCount(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

function checkSpec(spec: ArraySpec): { dtype: Dtype; count: number } {
  const dtype = wireDtype(spec.dtype);
  if (spec.shape.some((d) => !Number.isInteger(d) || d < 0)) {
    throw new StreamError("shape_mismatch", `${spec.name}: bad shape ${JSON.stringify(spec.shape)}`);
  }
  return { dtype, count: elementCount(spec.shape) };
}

/** Bytes the arrays of `specs` hold. */
export function declaredNbytes(specs: readonly ArraySpec[]): number {
  return specs.reduce((sum, spec) => {
    const { dtype, count } = checkSpec(spec);
    return sum + count * dtype.itemsize;
  }, 0);
}

/** A zero-filled array of a spec. */
export function emptyArray(spec: ArraySpec): NamedArray {
  const { dtype, count } = checkSpec(spec);
  const data = dtype.view(new ArrayBuffer(count * dtype.itemsize), 0, count * dtype.lanes);
  return { name: spec.name, dtype: dtype.typestr, shape: [...spec.shape], data };
}

/** The raw little-endian bytes of one array (a view, no copy). */
export function rawBytes(array: NamedArray): Buffer {
  const { dtype, count } = checkSpec(array);
  if (array.data.length !== count * dtype.lanes) {
    throw new StreamError(
      "shape_mismatch",
      `${array.name}: ${array.data.length} numbers for shape ${JSON.stringify(array.shape)} of ${dtype.typestr}`,
    );
  }
  return Buffer.from(array.data.buffer, array.data.byteOffset, array.data.byteLength);
}

/** Names, canonical dtypes and shapes of the arrays. */
export function specsOf(arrays: readonly NamedArray[]): ArraySpec[] {
  const names = new Set(arrays.map((a) => a.name));
  if (names.size !== arrays.length) throw new Error("array names must be unique");
  return arrays.map((a) => ({ name: a.name, dtype: wireDtype(a.dtype).typestr, shape: [...a.shape] }));
}

/** Hex sha256 of the arrays' raw byte stream. */
export function sha256Of(arrays: readonly NamedArray[]): string {
  const hash = createHash("sha256");
  for (const array of arrays) hash.update(rawBytes(array));
  return hash.digest("hex");
}

/**
 * The raw byte stream in chunks of `chunkBytes` (the last may be shorter); at least one chunk,
 * empty for a blob without bytes. A chunk inside one array is a view; one that spans arrays is a copy.
 */
export function rawChunks(arrays: readonly NamedArray[], chunkBytes = MAX_CHUNK_BYTES): Buffer[] {
  if (!Number.isInteger(chunkBytes) || chunkBytes < 1) throw new Error(`bad chunk size ${chunkBytes}`);
  const chunks: Buffer[] = [];
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  for (const array of arrays) {
    const raw = rawBytes(array);
    let pos = 0;
    if (pendingBytes > 0) {
      const take = Math.min(chunkBytes - pendingBytes, raw.length);
      pending.push(raw.subarray(0, take));
      pendingBytes += take;
      pos = take;
      if (pendingBytes === chunkBytes) {
        chunks.push(Buffer.concat(pending));
        pending = [];
        pendingBytes = 0;
      }
    }
    while (raw.length - pos >= chunkBytes) {
      chunks.push(raw.subarray(pos, pos + chunkBytes));
      pos += chunkBytes;
    }
    if (pos < raw.length) {
      pending.push(raw.subarray(pos));
      pendingBytes += raw.length - pos;
    }
  }
  if (pendingBytes > 0) chunks.push(Buffer.concat(pending));
  return chunks.length > 0 ? chunks : [Buffer.alloc(0)];
}

/** Rebuilds arrays from the chunks of their stream, fed in order, hashing as it goes. */
export class Reassembler {
  private readonly arrays: NamedArray[];
  private readonly targets: Buffer[];
  private readonly hash = createHash("sha256");
  private readonly nbytes: number;
  private received = 0;
  private index = 0; // array being filled
  private offset = 0; // bytes of it filled

  constructor(specs: readonly ArraySpec[]) {
    this.arrays = specs.map(emptyArray);
    this.targets = this.arrays.map((a) => Buffer.from(a.data.buffer, a.data.byteOffset, a.data.byteLength));
    this.nbytes = this.targets.reduce((sum, t) => sum + t.length, 0);
  }

  feed(chunk: Uint8Array): void {
    if (this.received + chunk.length > this.nbytes) {
      throw new StreamError("overflow", `${this.received + chunk.length} bytes received, the arrays hold ${this.nbytes}`);
    }
    this.hash.update(chunk);
    this.received += chunk.length;
    let pos = 0;
    while (pos < chunk.length) {
      const target = this.targets[this.index]!;
      const take = Math.min(target.length - this.offset, chunk.length - pos);
      target.set(chunk.subarray(pos, pos + take), this.offset);
      pos += take;
      this.offset += take;
      if (this.offset === target.length) {
        this.index += 1;
        this.offset = 0;
      }
    }
  }

  /** The arrays; throws `incomplete` when bytes are missing, `hash_mismatch` when they are not the declared ones. */
  finish(expectedSha256?: string): NamedArray[] {
    if (this.received < this.nbytes) {
      throw new StreamError("incomplete", `${this.received} of ${this.nbytes} bytes received`);
    }
    const actual = this.hash.digest("hex");
    if (expectedSha256 !== undefined && actual !== expectedSha256.toLowerCase()) {
      throw new StreamError("hash_mismatch", `sha256 of the stream is ${actual}, expected ${expectedSha256}`);
    }
    return this.arrays;
  }
}

/** Whole arrays from a chunked stream; hash-checked when `expectedSha256` is given. */
export function assemble(specs: readonly ArraySpec[], chunks: Iterable<Uint8Array>, expectedSha256?: string): NamedArray[] {
  const reassembler = new Reassembler(specs);
  for (const chunk of chunks) reassembler.feed(chunk);
  return reassembler.finish(expectedSha256);
}

/** Why a TensorRef cannot point at a readable stream of its arrays, or undefined (roundlog's tensor_ref_problem). */
export function tensorRefProblem(ref: TensorRef): string | undefined {
  const span = ref.last_offset - ref.first_offset + 1;
  if (!ref.key) return "empty key";
  if (ref.partition < 0 || !(0 <= ref.first_offset && ref.first_offset <= ref.last_offset)) {
    return `partition ${ref.partition}, offsets ${ref.first_offset}..${ref.last_offset}`;
  }
  if (!(1 <= ref.chunks && ref.chunks <= span)) return `${ref.chunks} chunks in ${span} offsets`;
  if (!/^[0-9a-f]{64}$/.test(ref.sha256)) return `sha256 ${JSON.stringify(ref.sha256.slice(0, 80))} is not 64 hex digits`;
  if (new Set(ref.arrays.map((a) => a.name)).size !== ref.arrays.length) return "array names repeat";
  let declared: number;
  try {
    declared = declaredNbytes(ref.arrays);
  } catch (error) {
    return (error as Error).message;
  }
  if (declared > MAX_TENSOR_BYTES) return `the arrays hold ${declared} bytes, more than ${MAX_TENSOR_BYTES}`;
  if (ref.nbytes !== declared) return `nbytes ${ref.nbytes}, the arrays hold ${declared}`;
  if (ref.chunks < Math.ceil(ref.nbytes / MAX_CHUNK_BYTES)) {
    return `${ref.nbytes} bytes cannot fit ${ref.chunks} chunks of at most ${MAX_CHUNK_BYTES}`;
  }
  return undefined;
}

/** One record of the tensors topic as the reader sees it. */
export interface TensorRecord {
  offset: number;
  key: Buffer | null;
  value: Buffer | null;
  headers: Record<string, Buffer | string | (Buffer | string)[] | undefined> | undefined;
}

function sequenceNumber(headers: TensorRecord["headers"]): number | undefined {
  const raw = headers?.[SEQ_HEADER];
  const value = Array.isArray(raw) ? raw[raw.length - 1] : raw;
  if (value === undefined) return undefined;
  const text = typeof value === "string" ? value : value.toString("ascii");
  return /^[0-9]+$/.test(text) ? Number(text) : undefined;
}

/**
 * The blob's chunks among `records` (the partition's records from first_offset on, in offset
 * order): those with the blob's key up to last_offset, checked for consecutive sequence numbers
 * and their count. Throws StreamError("incomplete") on a missing or misplaced chunk.
 */
export function chunksOf(ref: TensorRef, records: Iterable<TensorRecord>): Buffer[] {
  const key = Buffer.from(ref.key, "utf8");
  const chunks: Buffer[] = [];
  for (const record of records) {
    if (record.offset < ref.first_offset || record.offset > ref.last_offset) continue;
    if (record.key === null || !record.key.equals(key)) continue;
    const seq = sequenceNumber(record.headers);
    if (seq !== chunks.length) {
      throw new StreamError("incomplete", `tensors of ${ref.key}: chunk ${String(seq)} where ${chunks.length} belongs`);
    }
    if (record.value === null) throw new StreamError("incomplete", `tensors of ${ref.key}: chunk ${seq} has no value`);
    chunks.push(record.value);
  }
  if (chunks.length !== ref.chunks) {
    throw new StreamError("incomplete", `tensors of ${ref.key}: ${chunks.length} of ${ref.chunks} chunks found`);
  }
  const total = chunks.reduce((sum, c) => sum + c.length, 0);
  if (total !== ref.nbytes) {
    throw new StreamError("incomplete", `tensors of ${ref.key}: ${total} bytes, the reference says ${ref.nbytes}`);
  }
  return chunks;
}

/** The arrays of a blob from its records: reference validated, chunks checked, sha256 verified. */
export function arraysFromRecords(ref: TensorRef, records: Iterable<TensorRecord>): NamedArray[] {
  const problem = tensorRefProblem(ref);
  if (problem !== undefined) throw new StreamError("incomplete", `tensors of ${ref.key}: ${problem}`);
  return assemble(ref.arrays, chunksOf(ref, records), ref.sha256);
}

// --- over Kafka ----------------------------------------------------------------------------------

/** How long a reader waits without any record of the blob before calling the stream incomplete. */
export const CHUNK_WAIT_MS = 15_000;

/**
 * Send the arrays' raw byte stream to the tensors topic as chunks keyed by `key` (all on the
 * partition the key hashes to, one at a time so they keep their order) and say where they landed.
 */
export async function writeTensors(
  bus: Bus,
  key: string,
  arrays: readonly NamedArray[],
  chunkBytes = MAX_CHUNK_BYTES,
): Promise<TensorRef> {
  const specs = specsOf(arrays);
  const chunks = rawChunks(arrays, chunkBytes);
  const placements = [];
  for (const [seq, chunk] of chunks.entries()) {
    placements.push(await bus.send(bus.topics.tensors, key, chunk, { [SEQ_HEADER]: String(seq) }));
  }
  const first = placements[0]!;
  const last = placements[placements.length - 1]!;
  if (placements.some((p) => p.partition !== first.partition)) {
    throw new Error(`chunks of ${key} were spread over partitions`);
  }
  return {
    key,
    partition: first.partition,
    first_offset: first.offset,
    last_offset: last.offset,
    chunks: chunks.length,
    nbytes: chunks.reduce((sum, c) => sum + c.length, 0),
    sha256: sha256Of(arrays),
    arrays: specs,
  };
}

/**
 * Reads blobs from the tensors topic through one long-lived consumer, one blob at a time.
 *
 * The consumer joins its (throwaway) group once, with every partition paused; a read seeks the
 * reference's partition to first_offset, resumes it until last_offset and pauses it again. (A
 * consumer per read would cost a group join per read: seconds on Tansu.)
 */
export class TensorReader {
  private queue: Promise<unknown> = Promise.resolve();
  private current: ((batch: Batch) => void) | undefined;

  private constructor(
    private readonly bus: Bus,
    private follower: Follower | undefined,
  ) {}

  static async open(bus: Bus): Promise<TensorReader> {
    const reader = new TensorReader(bus, undefined);
    reader.follower = await bus.follow(bus.topics.tensors, new Map(), (batch) => reader.current?.(batch), "tensors");
    return reader;
  }

  /** The arrays `ref` points at, checked; reads queue up behind each other. */
  read(ref: TensorRef, waitMs = CHUNK_WAIT_MS): Promise<NamedArray[]> {
    const result = this.queue.then(() => this.readNow(ref, waitMs));
    this.queue = result.catch(() => undefined);
    return result;
  }

  async close(): Promise<void> {
    if (this.follower) await this.bus.release(this.follower);
    this.follower = undefined;
  }

  private async readNow(ref: TensorRef, waitMs: number): Promise<NamedArray[]> {
    const follower = this.follower;
    if (follower === undefined) throw new Error("the tensor reader is closed");
    const problem = tensorRefProblem(ref);
    if (problem !== undefined) throw new StreamError("incomplete", `tensors of ${ref.key}: ${problem}`);
    const topic = this.bus.topics.tensors;
    if (ref.partition >= (await this.bus.partitionCount(topic))) {
      throw new StreamError("incomplete", `tensors of ${ref.key}: ${topic} has no partition ${ref.partition}`);
    }
    const key = Buffer.from(ref.key, "utf8");
    const records: TensorRecord[] = [];
    let position = ref.first_offset; // the next offset to read
    let progress = Date.now();
    let complete!: () => void;
    const done = new Promise<void>((resolve) => (complete = resolve));
    this.current = (batch) => {
      const first = Number(batch.messages[0]?.offset ?? -1);
      // After a seek the first batch starts at the seek offset, and each batch where the last
      // ended (the topic has no gaps); a batch from anywhere else predates the seek.
      if (batch.partition !== ref.partition || first > position) return;
      progress = Date.now();
      for (const message of batch.messages) {
        const offset = Number(message.offset);
        if (offset < position) continue;
        if (offset > ref.last_offset) break;
        position = offset + 1;
        if (message.key !== null && message.key.equals(key)) {
          records.push({ offset, key: message.key, value: message.value, headers: message.headers });
        }
      }
      if (position > ref.last_offset || Number(batch.messages[batch.messages.length - 1]?.offset) > ref.last_offset) {
        this.current = undefined;
        follower.stopReading(ref.partition);
        complete();
      }
    };
    follower.readFrom(ref.partition, ref.first_offset);
    let timer: NodeJS.Timeout | undefined;
    try {
      const stalled = new Promise<never>((_, reject) => {
        timer = setInterval(() => {
          if (Date.now() - progress > waitMs) {
            reject(new StreamError("incomplete", `tensors of ${ref.key}: no record at offset ${position} for ${waitMs} ms`));
          }
        }, 100);
      });
      await Promise.race([done, stalled]);
    } finally {
      clearInterval(timer);
      if (this.current !== undefined) {
        this.current = undefined;
        follower.stopReading(ref.partition);
      }
    }
    return arraysFromRecords(ref, records);
  }
}

/** The arrays a TensorRef points at, read once through a reader of their own (see TensorReader). */
export async function readTensors(bus: Bus, ref: TensorRef, waitMs = CHUNK_WAIT_MS): Promise<NamedArray[]> {
  const reader = await TensorReader.open(bus);
  try {
    return await reader.read(ref, waitMs);
  } finally {
    await reader.close();
  }
}
