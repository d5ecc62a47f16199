package dev.roundlog.client;

import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.UUID;

/** roundlog's deterministic ids: UUIDv5 (RFC 4122, SHA-1) in the namespace uuid5(NAMESPACE_URL, "roundlog.v1"). */
public final class Ids {
    /** RFC 4122's namespace for URLs. */
    public static final UUID NAMESPACE_URL = UUID.fromString("6ba7b811-9dad-11d1-80b4-00c04fd430c8");
    /** The namespace of every id roundlog derives. */
    public static final UUID NAMESPACE = uuid5(NAMESPACE_URL, "roundlog.v1");

    private Ids() {}

    /** The id derived from {@code parts} joined by "/". */
    public static String derived(String... parts) {
        return uuid5(NAMESPACE, String.join("/", parts)).toString();
    }

    /** A client's update in a round: its id, which is also the tensors key of its chunks. */
    public static String updateId(String roundId, String clientId) {
        return derived(roundId, "client", clientId, "update");
    }

    /** The event id of a client's answer to a round; {@code task} is training, validation or inference. */
    public static String answerEventId(String roundId, String clientId, String task) {
        return derived(roundId, "client", clientId, task);
    }

    /** UUID version 5 of {@code name} (UTF-8) in {@code namespace}. */
    public static UUID uuid5(UUID namespace, String name) {
        MessageDigest sha1;
        try {
            sha1 = MessageDigest.getInstance("SHA-1");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException("SHA-1 is required of every JDK", e);
        }
        ByteBuffer ns = ByteBuffer.allocate(16);
        ns.putLong(namespace.getMostSignificantBits()).putLong(namespace.getLeastSignificantBits());
        sha1.update(ns.array());
        byte[] hash = sha1.digest(name.getBytes(StandardCharsets.UTF_8));
        hash[6] = (byte) ((hash[6] & 0x0f) | 0x50); // version 5
        hash[8] = (byte) ((hash[8] & 0x3f) | 0x80); // RFC 4122 variant
        ByteBuffer bytes = ByteBuffer.wrap(hash, 0, 16);
        return new UUID(bytes.getLong(), bytes.getLong());
    }
}
