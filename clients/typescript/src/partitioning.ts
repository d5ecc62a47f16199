/**
 * Kafka Java's default partitioner for keyed records: murmur2 (seed 0x9747b28c) of the key's
 * bytes as a signed 32-bit int, sign bit cleared, modulo the partition count. roundlog refuses an
 * event found on another partition (`wrong_partition`), so every record states its partition.
 */

/** Kafka's murmur2 of `data` (org.apache.kafka.common.utils.Utils.murmur2), as a signed 32-bit int. */
export function murmur2(data: Uint8Array): number {
  const m = 0x5bd1e995;
  const r = 24;
  const length = data.length;
  let h = 0x9747b28c ^ length;
  const whole = length & ~3;
  for (let i = 0; i < whole; i += 4) {
    let k = data[i]! | (data[i + 1]! << 8) | (data[i + 2]! << 16) | (data[i + 3]! << 24);
    k = Math.imul(k, m);
    k ^= k >>> r;
    k = Math.imul(k, m);
    h = Math.imul(h, m) ^ k;
  }
  const tail = length & 3; // Java's switch with fall-through
  if (tail >= 3) h ^= data[whole + 2]! << 16;
  if (tail >= 2) h ^= data[whole + 1]! << 8;
  if (tail >= 1) {
    h ^= data[whole]!;
    h = Math.imul(h, m);
  }
  h ^= h >>> 13;
  h = Math.imul(h, m);
  h ^= h >>> 15;
  return h | 0;
}

/** The partition of `key` (UTF-8) among `partitions`, as Kafka's Java client chooses it. */
export function partitionFor(key: string | Uint8Array, partitions: number): number {
  if (!Number.isInteger(partitions) || partitions < 1) throw new Error(`bad partition count ${partitions}`);
  const bytes = typeof key === "string" ? Buffer.from(key, "utf8") : key;
  return (murmur2(bytes) & 0x7fffffff) % partitions;
}
