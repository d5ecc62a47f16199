package dev.roundlog.client;

import java.nio.charset.StandardCharsets;
import org.apache.kafka.common.utils.Utils;

/**
 * The partition Kafka Java's default partitioner gives a key: murmur2 of its UTF-8 bytes, sign bit
 * cleared, modulo the partition count. roundlog states the partition on every record it writes.
 */
public final class Partitioning {
    private Partitioning() {}

    /** The signed 32-bit murmur2 hash of the key's UTF-8 bytes. */
    public static int murmur2(String key) {
        return Utils.murmur2(key.getBytes(StandardCharsets.UTF_8));
    }

    /** The partition of {@code key} in a topic of {@code count} partitions. */
    public static int partition(String key, int count) {
        if (count < 1) {
            throw new IllegalArgumentException("a topic has at least one partition, not " + count);
        }
        return Utils.toPositive(murmur2(key)) % count;
    }
}
