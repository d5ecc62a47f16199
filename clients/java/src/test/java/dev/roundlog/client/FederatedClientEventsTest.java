package dev.roundlog.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;

import com.fasterxml.jackson.databind.JsonNode;
import dev.roundlog.client.Tensors.NamedArray;
import dev.roundlog.client.Tensors.TensorRef;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import org.apache.avro.generic.GenericRecord;
import org.junit.jupiter.api.Test;

/** The events the client writes encode with the current schemas and carry the contract's ids. */
class FederatedClientEventsTest {
    static final Codec CODEC = Codec.load();

    final Settings settings = Settings.fromEnv(Map.of());
    final Trainer trainer = new Trainer(0.25, 120);
    final List<NamedArray> model = TensorVectorsTest.arrays();

    FederatedClient client(String id) throws Exception {
        return new FederatedClient(settings, id, trainer, Map.of("language", "java"));
    }

    /** The ClientsAssigned of events.json, as the client would read it. */
    static GenericRecord assignment() {
        for (JsonNode vector : Vectors.load("events.json").get("events")) {
            if (vector.get("type").asText().equals("ClientsAssigned")) {
                return CODEC.decode(Vectors.hex(vector.get("single_object"))).orElseThrow();
            }
        }
        throw new AssertionError("no ClientsAssigned vector");
    }

    static GenericRecord roundTrip(GenericRecord event) {
        byte[] bytes = CODEC.encode(event);
        Optional<GenericRecord> back = CODEC.decode(bytes);
        assertEquals(event, back.orElseThrow());
        assertArrayEquals(bytes, CODEC.encode(back.get()));
        return back.get();
    }

    @Test
    void heartbeat() throws Exception {
        GenericRecord beat = roundTrip(client("java-0").heartbeatEvent());
        assertEquals("java-0", beat.get("client_id"));
        assertEquals("[trainer, validator]", beat.get("roles").toString());
        assertEquals(Map.of("language", "java"), beat.get("labels"));
    }

    @Test
    void answersCarryTheDerivedIds() throws Exception {
        GenericRecord job = assignment();
        String round = job.get("round_id").toString();
        String sha = TensorRef.fromAvro((GenericRecord) job.get("model")).sha256();
        FederatedClient client = client("client-7");

        var trained = trainer.train(model, null);
        String updateId = Ids.updateId(round, "client-7");
        TensorRef ref = new TensorRef(updateId, 3, 10, 10, 1, 59, Tensors.sha256(trained.arrays()), Tensors.specsOf(trained.arrays()));
        GenericRecord update = roundTrip(client.updateEvent(job, trained, ref, sha));
        assertEquals(Ids.answerEventId(round, "client-7", "training"), update.get("event_id"));
        assertEquals("e7391a6b-5d80-50e9-9c22-2d35381e11a0", update.get("update_id"));
        assertEquals(job.get("session_id"), update.get("session_id"));
        assertEquals(sha, update.get("base_model_sha256"));
        assertEquals(ref, TensorRef.fromAvro((GenericRecord) update.get("tensor")));

        GenericRecord validation = roundTrip(client.validationEvent(job, trainer.validate(model, null), sha));
        assertEquals("4bd4fce9-56d2-5eeb-af93-01706138f2aa", validation.get("event_id"));
        assertEquals(job.get("model_id"), validation.get("model_id"));
        assertEquals(sha, validation.get("model_sha256"));

        GenericRecord prediction = roundTrip(client.predictionEvent(job, trainer.predict(model, null), sha));
        assertEquals("ff084fbf-f132-5841-a287-cf4d712805a6", prediction.get("event_id"));
        assertEquals("arrays=5", prediction.get("summary"));
    }
}
