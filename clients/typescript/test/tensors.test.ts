import assert from "node:assert/strict";
import { describe, it } from "node:test";
import type { TensorRef } from "../src/events.js";
import {
  MAX_CHUNK_BYTES,
  SEQ_HEADER,
  StreamError,
  arraysFromRecords,
  assemble,
  chunksOf,
  rawChunks,
  sha256Of,
  specsOf,
  tensorRefProblem,
  wireDtype,
  type NamedArray,
  type TensorRecord,
} from "../src/tensors.js";
import { hex, vectors } from "./vectors.js";

const data = vectors("tensors.json") as {
  chunk_bytes: number;
  arrays: { name: string; dtype: string; shape: number[]; values: number[] }[];
  stream: string;
  sha256: string;
  records: { key: string; headers: Record<string, string>; value: string }[];
  tensor_ref: TensorRef;
  dtypes: { same: string[][]; refused: string[] };
};

/** The vector's arrays as typed arrays. */
function vectorArrays(): NamedArray[] {
  return data.arrays.map((a) => {
    const values = a.values;
    const typed = {
      "<f4": () => Float32Array.from(values),
      "<f8": () => Float64Array.from(values),
      "<i8": () => BigInt64Array.from(values.map(BigInt)),
      "|u1": () => Uint8Array.from(values),
    }[a.dtype];
    assert.ok(typed, `dtype ${a.dtype} in the test's table`);
    return { name: a.name, dtype: a.dtype, shape: a.shape, data: typed() };
  });
}

function asRecords(offset0 = 0): TensorRecord[] {
  return data.records.map((r, i) => ({
    offset: offset0 + i,
    key: Buffer.from(r.key, "utf8"),
    value: hex(r.value),
    headers: Object.fromEntries(Object.entries(r.headers).map(([k, v]) => [k, Buffer.from(v, "ascii")])),
  }));
}

describe("tensors against tensors.json", () => {
  it("raw stream and sha256", () => {
    const arrays = vectorArrays();
    assert.equal(Buffer.concat(rawChunks(arrays, 1 << 30)).toString("hex"), data.stream);
    assert.equal(sha256Of(arrays), data.sha256);
  });

  it("chunking gives the exact records", () => {
    const chunks = rawChunks(vectorArrays(), data.chunk_bytes);
    assert.deepEqual(
      chunks.map((c, seq) => ({ key: data.tensor_ref.key, headers: { [SEQ_HEADER]: String(seq) }, value: c.toString("hex") })),
      data.records,
    );
  });

  it("the TensorRef of chunks written from offset 0", () => {
    const arrays = vectorArrays();
    const chunks = rawChunks(arrays, data.chunk_bytes);
    const ref: TensorRef = {
      key: data.tensor_ref.key,
      partition: 0,
      first_offset: 0,
      last_offset: chunks.length - 1,
      chunks: chunks.length,
      nbytes: chunks.reduce((n, c) => n + c.length, 0),
      sha256: sha256Of(arrays),
      arrays: specsOf(arrays),
    };
    assert.deepEqual(ref, data.tensor_ref);
    assert.equal(tensorRefProblem(ref), undefined);
  });

  it("reassembling the records gives the arrays back", () => {
    const back = arraysFromRecords(data.tensor_ref, asRecords());
    assert.deepEqual(
      back.map((a) => ({ name: a.name, dtype: a.dtype, shape: a.shape, values: Array.from(a.data, Number) })),
      data.arrays,
    );
  });

  it("skips interleaved records of other blobs", () => {
    const records = asRecords().flatMap((r) => [r, { ...r, key: Buffer.from("other") }]);
    records.forEach((r, i) => (r.offset = 10 + i));
    const ref = { ...data.tensor_ref, first_offset: 10, last_offset: 10 + records.length - 1 };
    assert.equal(sha256Of(arraysFromRecords(ref, records)), data.sha256);
  });

  it("refuses a missing, reordered or corrupt chunk", () => {
    const records = asRecords();
    const missing = records.filter((_, i) => i !== 2);
    assert.throws(() => arraysFromRecords(data.tensor_ref, missing), (e: StreamError) => e.reason === "incomplete");
    const swapped = [records[1]!, records[0]!, records[2]!, records[3]!];
    assert.throws(() => chunksOf(data.tensor_ref, swapped), /chunk 1 where 0 belongs/);
    const corrupt = records.map((r, i) => (i === 0 ? { ...r, value: Buffer.alloc(r.value!.length) } : r));
    assert.throws(() => arraysFromRecords(data.tensor_ref, corrupt), (e: StreamError) => e.reason === "hash_mismatch");
  });

  it("dtype spellings", () => {
    for (const same of data.dtypes.same) {
      const dtypes = same.map(wireDtype);
      assert.ok(dtypes.every((d) => d === dtypes[0]), `${same.join(", ")} are one dtype`);
      assert.equal(dtypes[0]!.typestr, same[0]);
    }
    for (const refused of data.dtypes.refused) assert.throws(() => wireDtype(refused), StreamError);
  });
});

describe("tensors", () => {
  it("chunks a large array at 1 MiB, across arrays, and reassembles it", () => {
    const big: NamedArray = { name: "w", dtype: "<f4", shape: [300_000], data: new Float32Array(300_000).map((_, i) => i / 7) };
    const small: NamedArray = { name: "b", dtype: "float64", shape: [3], data: Float64Array.from([1, 2, 3]) };
    const chunks = rawChunks([big, small]);
    assert.deepEqual(chunks.map((c) => c.length), [MAX_CHUNK_BYTES, 1_200_024 - MAX_CHUNK_BYTES]);
    const back = assemble(specsOf([big, small]), chunks, sha256Of([big, small]));
    assert.deepEqual(back[0]!.data, big.data);
    assert.equal(back[1]!.dtype, "<f8");
    assert.deepEqual(back[1]!.data, small.data);
  });

  it("an empty blob is one empty chunk", () => {
    const empty: NamedArray = { name: "e", dtype: "<f4", shape: [0], data: new Float32Array(0) };
    assert.deepEqual(rawChunks([empty]).map((c) => c.length), [0]);
  });
});
