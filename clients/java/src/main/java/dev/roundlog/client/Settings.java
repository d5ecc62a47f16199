package dev.roundlog.client;

import java.util.Map;
import java.util.Optional;

/**
 * Where the broker is and how this client signs, from the same {@code ROUNDLOG_*} variables every
 * roundlog process reads.
 *
 * @param kafkaBootstrap {@code ROUNDLOG_KAFKA_BOOTSTRAP}, default {@code 127.0.0.1:9092}
 * @param topicPrefix {@code ROUNDLOG_TOPIC_PREFIX}, default {@code roundlog}
 * @param auth {@code ROUNDLOG_AUTH=signed}: every event must be signed and assignments are verified
 * @param keyFile {@code ROUNDLOG_KEY_FILE}: this client's Ed25519 PKCS#8 PEM private key, if any
 */
public record Settings(String kafkaBootstrap, String topicPrefix, boolean auth, Optional<String> keyFile) {

    /** Settings from the process environment. */
    public static Settings fromEnv() {
        return fromEnv(System.getenv());
    }

    /** Settings from {@code env}; an unknown {@code ROUNDLOG_AUTH} value or a signed deployment without a key is refused. */
    public static Settings fromEnv(Map<String, String> env) {
        String auth = get(env, "ROUNDLOG_AUTH").orElse("off").toLowerCase();
        if (!auth.equals("off") && !auth.equals("signed")) {
            throw new IllegalArgumentException("ROUNDLOG_AUTH must be off or signed, not '" + auth + "'");
        }
        Optional<String> keyFile = get(env, "ROUNDLOG_KEY_FILE");
        if (auth.equals("signed") && keyFile.isEmpty()) {
            throw new IllegalArgumentException(
                    "ROUNDLOG_AUTH=signed: set ROUNDLOG_KEY_FILE to this client's key (`roundlog keys create`)");
        }
        return new Settings(
                get(env, "ROUNDLOG_KAFKA_BOOTSTRAP").orElse("127.0.0.1:9092"),
                get(env, "ROUNDLOG_TOPIC_PREFIX").orElse("roundlog"),
                auth.equals("signed"),
                keyFile);
    }

    public String eventsTopic() {
        return topicPrefix + ".events";
    }

    public String tensorsTopic() {
        return topicPrefix + ".tensors";
    }

    public String clientsTopic() {
        return topicPrefix + ".clients";
    }

    private static Optional<String> get(Map<String, String> env, String name) {
        String value = env.get(name);
        return value == null || value.isEmpty() ? Optional.empty() : Optional.of(value);
    }
}
