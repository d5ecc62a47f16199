import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { predict, train, validate } from "../src/deterministic.js";
import type { NamedArray } from "../src/tensors.js";

const model = (): NamedArray[] => [
  { name: "w", dtype: "<f4", shape: [2, 2], data: Float32Array.from([0.1, -1, 2.5, 16777216]) },
  { name: "b", dtype: "<f8", shape: [2], data: Float64Array.from([0.1, 1]) },
  { name: "n", dtype: "<i8", shape: [], data: BigInt64Array.from([7n]) },
  { name: "m", dtype: "|b1", shape: [2], data: Uint8Array.from([1, 0]) },
];

describe("deterministic trainer", () => {
  it("training adds the offset in each float array's own precision", () => {
    const base = model();
    const out = train(base, 0.25, 80);
    assert.equal(out.numExamples, 80);
    assert.deepEqual(out.metrics, { loss: 1 / 1.25, offset: 0.25 });
    assert.deepEqual(Array.from(out.arrays[0]!.data as Float32Array), [0.1, -1, 2.5, 16777216].map((v) => Math.fround(Math.fround(v) + 0.25)));
    assert.equal((out.arrays[0]!.data as Float32Array)[3], 16777216); // float32 rounding: 2^24 + 0.25 rounds back
    assert.deepEqual(Array.from(out.arrays[1]!.data as Float64Array), [0.1 + 0.25, 1.25]);
    assert.equal(out.arrays[2], base[2]);
    assert.equal(out.arrays[3], base[3]);
    assert.deepEqual(out.arrays.map((a) => [a.name, a.dtype, a.shape]), base.map((a) => [a.name, a.dtype, a.shape]));
    assert.deepEqual(Array.from(base[0]!.data as Float32Array), Array.from(Float32Array.from([0.1, -1, 2.5, 16777216])));
  });

  it("validation: mean of the float elements and accuracy 0.5", () => {
    const out = validate(model(), 80);
    const floats = [...Float32Array.from([0.1, -1, 2.5, 16777216]), 0.1, 1];
    assert.deepEqual(out, { numExamples: 80, metrics: { mean: floats.reduce((a, b) => a + b, 0) / 6, accuracy: 0.5 } });
  });

  it("inference: array and element counts", () => {
    assert.deepEqual(predict(model()), { summary: "arrays=4", metrics: { elements: 9 } });
  });
});
