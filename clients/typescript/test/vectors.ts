/** The shared test vectors in ../../schemas/vectors (never modified here). */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { schemasDir } from "../src/codec.js";

export const VECTORS_DIR = join(schemasDir(), "vectors");

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export function vectors(file: string): any {
  return JSON.parse(readFileSync(join(VECTORS_DIR, file), "utf8"));
}

export const hex = (s: string): Buffer => Buffer.from(s, "hex");
