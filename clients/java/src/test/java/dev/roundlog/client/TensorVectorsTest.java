package dev.roundlog.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;

import com.fasterxml.jackson.databind.JsonNode;
import dev.roundlog.client.Tensors.NamedArray;
import dev.roundlog.client.Tensors.TensorRef;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import org.apache.avro.Schema;
import org.junit.jupiter.api.Test;

/** tensors.json: the arrays' stream, its chunk records and sha256, the TensorRef, and reassembly. */
class TensorVectorsTest {
    static final JsonNode VECTORS = Vectors.load("tensors.json");

    static List<NamedArray> arrays() {
        List<NamedArray> arrays = new ArrayList<>();
        for (JsonNode a : VECTORS.get("arrays")) {
            String dtype = a.get("dtype").asText();
            List<Long> shape = new ArrayList<>();
            a.get("shape").forEach(d -> shape.add(d.asLong()));
            Tensors.DType type = Tensors.dtype(dtype);
            ByteBuffer buffer = ByteBuffer.allocate(a.get("values").size() * type.itemsize()).order(ByteOrder.LITTLE_ENDIAN);
            for (JsonNode v : a.get("values")) {
                switch (dtype) {
                    case "<f4" -> buffer.putFloat((float) v.asDouble());
                    case "<f8" -> buffer.putDouble(v.asDouble());
                    case "<i8" -> buffer.putLong(v.asLong());
                    case "|u1" -> buffer.put((byte) v.asInt());
                    default -> throw new AssertionError("no vector builder for " + dtype);
                }
            }
            arrays.add(NamedArray.of(a.get("name").asText(), dtype, shape, buffer.array()));
        }
        return arrays;
    }

    @Test
    void chunksAreTheExactRecords() {
        List<NamedArray> arrays = arrays();
        List<byte[]> chunks = Tensors.chunks(arrays, VECTORS.get("chunk_bytes").asInt());
        JsonNode records = VECTORS.get("records");
        assertEquals(records.size(), chunks.size());
        ByteBuffer stream = ByteBuffer.allocate(Vectors.hex(VECTORS.get("stream")).length);
        for (int seq = 0; seq < chunks.size(); seq++) {
            JsonNode record = records.get(seq);
            assertArrayEquals(Vectors.hex(record.get("value")), chunks.get(seq), "chunk " + seq);
            assertEquals(record.get("headers").get(Tensors.SEQ_HEADER).asText(),
                    new String(Tensors.seqHeader(seq).value(), StandardCharsets.US_ASCII));
            assertEquals(VECTORS.get("tensor_ref").get("key").asText(), record.get("key").asText());
            stream.put(chunks.get(seq));
        }
        assertArrayEquals(Vectors.hex(VECTORS.get("stream")), stream.array());
        assertEquals(VECTORS.get("sha256").asText(), Tensors.sha256(arrays));
    }

    @Test
    void theTensorRefOfChunksWrittenFromOffsetZero() throws Exception {
        List<NamedArray> arrays = arrays();
        JsonNode expected = VECTORS.get("tensor_ref");
        List<byte[]> chunks = Tensors.chunks(arrays, VECTORS.get("chunk_bytes").asInt());
        TensorRef ref = new TensorRef(expected.get("key").asText(), 0, 0, chunks.size() - 1, chunks.size(),
                chunks.stream().mapToLong(c -> c.length).sum(), Tensors.sha256(arrays), Tensors.specsOf(arrays));
        Schema schema = Codec.load().schema("UpdateReceived").getField("tensor").schema();
        assertEquals(EventVectorsTest.fromAvroJson(schema, expected), ref.toAvro(schema));
        assertEquals(ref, TensorRef.fromAvro(ref.toAvro(schema)));
        assertNull(ref.problem(), "a reference the fold would accept");
    }

    @Test
    void reassemblingGivesTheArraysBack() {
        List<NamedArray> arrays = arrays();
        List<byte[]> chunks = new ArrayList<>();
        VECTORS.get("records").forEach(r -> chunks.add(Vectors.hex(r.get("value"))));
        List<NamedArray> back = Tensors.assemble(Tensors.specsOf(arrays), chunks, VECTORS.get("sha256").asText());
        assertEquals(arrays.size(), back.size());
        for (int i = 0; i < arrays.size(); i++) {
            assertEquals(arrays.get(i).spec(), back.get(i).spec());
            assertArrayEquals(arrays.get(i).data(), back.get(i).data(), arrays.get(i).name());
        }
        // one chunk of the whole stream reassembles the same; a missing or changed byte does not
        List<byte[]> whole = List.of(Vectors.hex(VECTORS.get("stream")));
        assertEquals(back.get(1).spec(), Tensors.assemble(Tensors.specsOf(arrays), whole, VECTORS.get("sha256").asText()).get(1).spec());
        assertThrows(Tensors.TensorException.class,
                () -> Tensors.assemble(Tensors.specsOf(arrays), chunks.subList(0, 3), VECTORS.get("sha256").asText()));
        List<byte[]> changed = new ArrayList<>(chunks);
        changed.set(0, chunks.get(0).clone());
        changed.get(0)[0] ^= 1;
        assertThrows(Tensors.TensorException.class,
                () -> Tensors.assemble(Tensors.specsOf(arrays), changed, VECTORS.get("sha256").asText()));
    }

    @Test
    void dtypeSpellings() {
        JsonNode dtypes = VECTORS.get("dtypes");
        for (JsonNode same : dtypes.get("same")) {
            Tensors.DType first = Tensors.dtype(same.get(0).asText());
            same.forEach(spelling -> assertEquals(first, Tensors.dtype(spelling.asText()), spelling.asText()));
            assertEquals(same.get(0).asText(), first.typestr());
        }
        for (JsonNode refused : dtypes.get("refused")) {
            assertThrows(Tensors.TensorException.class, () -> Tensors.dtype(refused.asText()), refused.asText());
        }
    }

    @Test
    void anEmptyStreamIsOneEmptyChunk() {
        List<byte[]> chunks = Tensors.chunks(List.of(NamedArray.of("e", "<f4", List.of(0L), new byte[0])), Tensors.CHUNK_BYTES);
        assertEquals(1, chunks.size());
        assertEquals(0, chunks.get(0).length);
    }
}
