/**
 * The deterministic trainer every roundlog client language implements identically, so an
 * integration test can compute the expected aggregate.
 *
 * - training: every float array (<f4, <f8) becomes base + offset in the array's own precision
 *   (float32: the sum rounded to float32); integer and bool arrays (and float16/complex) are kept;
 *   num_examples = N; metrics {loss: 1 / (1 + |offset|), offset}.
 * - validation: num_examples = N; metrics {mean: mean of all elements of all float arrays (as
 *   doubles; 0 when there are none), accuracy: 0.5}.
 * - inference: summary "arrays=<count>"; metrics {elements: total element count}.
 */

import type { PredictResult, TrainResult, ValidateResult } from "./client.js";
import { type NamedArray, wireDtype } from "./tensors.js";

function isFloat(array: NamedArray): array is NamedArray & { data: Float32Array | Float64Array } {
  return wireDtype(array.dtype).float;
}

/** The arrays shifted by `offset` (float arrays only), in new arrays; names, dtypes and shapes kept. */
export function shifted(arrays: readonly NamedArray[], offset: number): NamedArray[] {
  return arrays.map((array) => {
    if (!isFloat(array)) return array;
    const data = array.data instanceof Float32Array ? new Float32Array(array.data.length) : new Float64Array(array.data.length);
    // A Float32Array stores Math.fround of each double sum: the float32 sum of two float32 numbers
    // (a double holds their exact sum's rounding, and rounding twice is exact for 24 < 53/2 bits).
    for (let i = 0; i < data.length; i++) data[i] = array.data[i]! + offset;
    return { ...array, shape: [...array.shape], data };
  });
}

export function train(arrays: readonly NamedArray[], offset: number, numExamples: number): TrainResult {
  return {
    arrays: shifted(arrays, offset),
    numExamples,
    metrics: { loss: 1 / (1 + Math.abs(offset)), offset },
  };
}

export function validate(arrays: readonly NamedArray[], numExamples: number): ValidateResult {
  let sum = 0;
  let count = 0;
  for (const array of arrays.filter(isFloat)) {
    for (let i = 0; i < array.data.length; i++) sum += array.data[i]!;
    count += array.data.length;
  }
  return { numExamples, metrics: { mean: count > 0 ? sum / count : 0, accuracy: 0.5 } };
}

export function predict(arrays: readonly NamedArray[]): PredictResult {
  const elements = arrays.reduce((n, a) => n + a.shape.reduce((x, y) => x * y, 1), 0);
  return { summary: `arrays=${arrays.length}`, metrics: { elements } };
}
