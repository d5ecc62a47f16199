package dev.roundlog.client;

import static org.junit.jupiter.api.Assertions.assertEquals;

import com.fasterxml.jackson.databind.JsonNode;
import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.Test;

/** ids.json and partitions.json: UUIDv5 ids and Kafka Java's default partitioner. */
class IdsAndPartitionsTest {
    @Test
    void namespaceAndDerivedIds() {
        JsonNode ids = Vectors.load("ids.json");
        assertEquals(ids.get("namespace").asText(), Ids.NAMESPACE.toString());
        for (JsonNode vector : ids.get("derived")) {
            List<String> parts = new ArrayList<>();
            vector.get("parts").forEach(p -> parts.add(p.asText()));
            assertEquals(vector.get("id").asText(), Ids.derived(parts.toArray(String[]::new)), parts.toString());
        }
    }

    @Test
    void updateIdsAndAnswerEventIds() {
        for (JsonNode vector : Vectors.load("ids.json").get("answers")) {
            String round = vector.get("round_id").asText();
            String client = vector.get("client_id").asText();
            assertEquals(vector.get("update_id").asText(), Ids.updateId(round, client), client);
            vector.get("event_ids").properties().forEach(task ->
                    assertEquals(task.getValue().asText(), Ids.answerEventId(round, client, task.getKey()), client + " " + task.getKey()));
        }
    }

    @Test
    void murmur2AndPartitions() {
        JsonNode vectors = Vectors.load("partitions.json");
        int checked = 0;
        for (JsonNode vector : vectors.get("keys")) {
            String key = vector.get("key").asText();
            assertEquals(vector.get("murmur2").asInt(), Partitioning.murmur2(key), key);
            for (JsonNode count : vectors.get("counts")) {
                int expected = vector.get("partitions").get(count.asText()).asInt();
                assertEquals(expected, Partitioning.partition(key, count.asInt()), key + " of " + count);
                checked++;
            }
        }
        assertEquals(2 * vectors.get("keys").size(), checked);
    }
}
