import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { murmur2, partitionFor } from "../src/partitioning.js";
import { vectors } from "./vectors.js";

const data = vectors("partitions.json") as {
  counts: number[];
  keys: { key: string; murmur2: number; partitions: Record<string, number> }[];
};

describe("partitioning against partitions.json", () => {
  for (const k of data.keys) {
    it(`key ${JSON.stringify(k.key)}`, () => {
      assert.equal(murmur2(Buffer.from(k.key, "utf8")), k.murmur2);
      for (const count of data.counts) assert.equal(partitionFor(k.key, count), k.partitions[String(count)]);
    });
  }
});
