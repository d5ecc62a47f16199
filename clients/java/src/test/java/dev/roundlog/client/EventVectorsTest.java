package dev.roundlog.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.fasterxml.jackson.databind.JsonNode;
import java.io.IOException;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Set;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.DecoderFactory;
import org.apache.avro.message.BinaryMessageEncoder;
import org.junit.jupiter.api.DynamicTest;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.TestFactory;

/** events.json: every event's single-object bytes decode to its Avro JSON value and encode back byte for byte. */
class EventVectorsTest {
    static final Codec CODEC = Codec.load();
    static final JsonNode EVENTS = Vectors.load("events.json").get("events");

    @TestFactory
    List<DynamicTest> eachEventDecodesAndEncodesExactly() {
        List<DynamicTest> tests = new ArrayList<>();
        for (JsonNode vector : EVENTS) {
            String type = vector.get("type").asText();
            tests.add(DynamicTest.dynamicTest(type, () -> {
                Schema schema = CODEC.schema(type);
                byte[] bytes = Vectors.hex(vector.get("single_object"));
                assertEquals(vector.get("fingerprint").asText(), Codec.fingerprintHex(schema), "fingerprint");
                assertEquals(vector.get("fingerprint").asText(), Vectors.HEX.formatHex(bytes, 2, 10), "header");

                GenericRecord expected = fromAvroJson(schema, vector.get("avro_json"));
                Optional<GenericRecord> decoded = CODEC.decode(bytes);
                assertTrue(decoded.isPresent(), "decodes");
                assertEquals(type, decoded.get().getSchema().getName());
                assertEquals(expected, decoded.get());
                assertEquals(expected.toString(), decoded.get().toString(), "same values in the same (map) order");

                assertArrayEquals(bytes, CODEC.encode(decoded.get()), "re-encoding the decoded record");
                assertArrayEquals(bytes, CODEC.encode(expected), "encoding the Avro JSON value");
                assertEquals(vector.get("partition_key").asText(), partitionKey(decoded.get()));
            }));
        }
        return tests;
    }

    @Test
    void everyEventTypeHasAVector() {
        Set<String> types = new HashSet<>();
        EVENTS.forEach(v -> types.add(v.get("type").asText()));
        assertEquals(new HashSet<>(Codec.EVENT_TYPES), types);
    }

    @Test
    void unknownFingerprintsAndOtherBytesAreSkipped() {
        byte[] bytes = Vectors.hex(EVENTS.get(0).get("single_object"));
        byte[] unknown = bytes.clone();
        unknown[2] ^= 0x55;
        assertTrue(CODEC.decode(unknown).isEmpty(), "unknown fingerprint");
        assertTrue(CODEC.decode(new byte[] {1, 2, 3}).isEmpty(), "not single-object");
        assertTrue(CODEC.decode(java.util.Arrays.copyOf(bytes, bytes.length - 3)).isEmpty(), "truncated");
        assertTrue(CODEC.decode(java.util.Arrays.copyOf(bytes, bytes.length + 1)).isEmpty(), "trailing bytes");
        assertTrue(CODEC.decode(null).isEmpty(), "no value");
    }

    @Test
    void aReleasedOlderVersionIsReadIntoTheCurrentShape() throws IOException {
        Schema v1;
        try (var in = Codec.class.getResourceAsStream("/roundlog/schemas/history/ClientHeartbeat/v1.avsc")) {
            v1 = new Schema.Parser().parse(in);
        }
        GenericRecord old = new GenericData.Record(v1);
        old.put("event_id", "0b7e1c3a-8d2f-4e6a-9c1b-5f4e3d2c1b0a");
        old.put("occurred_at", 1796117415250L);
        old.put("client_id", "client-7");
        old.put("roles", List.of(new GenericData.EnumSymbol(v1.getField("roles").schema().getElementType(), "trainer")));
        var buffer = new BinaryMessageEncoder<GenericRecord>(GenericData.get(), v1).encode(old);
        byte[] bytes = new byte[buffer.remaining()];
        buffer.get(bytes);

        GenericRecord decoded = CODEC.decode(bytes).orElseThrow();
        assertEquals(CODEC.schema("ClientHeartbeat"), decoded.getSchema());
        assertEquals("client-7", decoded.get("client_id"));
        assertEquals(Map.of(), decoded.get("labels"));
    }

    static GenericRecord fromAvroJson(Schema schema, JsonNode json) throws IOException {
        String text = Vectors.JSON.writeValueAsString(json);
        return (GenericRecord) new Codec.PlainReader(schema).read(null, DecoderFactory.get().jsonDecoder(schema, text));
    }

    /** The key an event is partitioned by: the session, or the client, model or key it is about. */
    static String partitionKey(GenericRecord event) {
        return switch (event.getSchema().getName()) {
            case "ClientHeartbeat" -> event.get("client_id").toString();
            case "ModelImported" -> event.get("model_id").toString();
            case "KeyRegistered", "KeyRevoked" -> event.get("key_id").toString();
            default -> event.get("session_id").toString();
        };
    }
}
