package dev.roundlog.client;

import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import org.apache.avro.AvroRuntimeException;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.DatumReader;
import org.apache.avro.io.Decoder;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.avro.message.SchemaStore;

/**
 * roundlog events as Avro single-object encoding ({@code C3 01}, the writer schema's 8-byte
 * little-endian CRC-64-AVRO fingerprint, the binary body) of {@link GenericRecord}s.
 *
 * <p>The schemas come from the jar ({@code roundlog/schemas}, copied from the repository's
 * {@code schemas/} at build time): the current one of each event, which is what this codec writes,
 * and the released older versions in {@code history/<Event>/v<N>.avsc}, which it reads into the
 * current shape. Decoded strings are {@link String}s and maps keep their wire order, so a decoded
 * record encodes back to the same bytes.
 */
public final class Codec {
    public static final String NAMESPACE = "roundlog.v1";
    /** Every event type of roundlog.v1: one {@code <Name>.avsc} each. */
    public static final List<String> EVENT_TYPES = List.of(
            "ModelImported", "SessionStarted", "RoundRequested", "ModelStaged", "ClientsAssigned",
            "UpdateReceived", "UpdateRejected", "ValidationReceived", "PredictionReceived", "RoundTimedOut",
            "RoundAggregated", "ShardAggregated", "RoundFailed", "SessionFinished", "ClientHeartbeat",
            "KeyRegistered", "KeyRevoked");

    private static final String ROOT = "/roundlog/schemas/";
    private static final int HEADER_SIZE = 10;
    /** The data model of every record this codec makes: Strings for strings, insertion-ordered maps. */
    public static final GenericData MODEL = new PlainGenericData();

    private final Map<String, Schema> current = new HashMap<>();
    private final Map<String, BinaryMessageEncoder<GenericRecord>> encoders = new HashMap<>();
    private final Map<String, BinaryMessageDecoder<GenericRecord>> decoders = new HashMap<>();
    private final SchemaStore.Cache store = new SchemaStore.Cache();

    /** A codec of the schemas this jar carries. */
    public static Codec load() {
        return new Codec();
    }

    private Codec() {
        for (String name : EVENT_TYPES) {
            Schema schema = parse(ROOT + name + ".avsc")
                    .orElseThrow(() -> new IllegalStateException("the jar lacks schema " + name + ".avsc"));
            if (!schema.getFullName().equals(NAMESPACE + "." + name)) {
                throw new IllegalStateException(name + ".avsc defines " + schema.getFullName());
            }
            current.put(name, schema);
            store.addSchema(schema);
            encoders.put(name, new BinaryMessageEncoder<>(MODEL, schema));
            BinaryMessageDecoder<GenericRecord> decoder = new BinaryMessageDecoder<>(MODEL, schema, store);
            for (int version = 1; ; version++) {
                Optional<Schema> old = parse(ROOT + "history/" + name + "/v" + version + ".avsc");
                if (old.isEmpty()) {
                    break;
                }
                store.addSchema(old.get());
                decoder.addSchema(old.get());
            }
            decoders.put(name, decoder);
        }
    }

    private static Optional<Schema> parse(String resource) {
        try (InputStream in = Codec.class.getResourceAsStream(resource)) {
            // one parser per file: each file defines its own copy of the shared named types
            return in == null ? Optional.empty() : Optional.of(new Schema.Parser().parse(in));
        } catch (IOException e) {
            throw new UncheckedIOException("reading " + resource, e);
        }
    }

    /** The current schema of an event type, e.g. {@code "UpdateReceived"}. */
    public Schema schema(String eventType) {
        Schema schema = current.get(eventType);
        if (schema == null) {
            throw new IllegalArgumentException("no event type " + eventType);
        }
        return schema;
    }

    /** Single-object encoding of {@code record} with the current schema of its event type. */
    public byte[] encode(GenericRecord record) {
        String name = record.getSchema().getName();
        BinaryMessageEncoder<GenericRecord> encoder = encoders.get(name);
        if (encoder == null || !record.getSchema().equals(current.get(name))) {
            throw new IllegalArgumentException("not a record of a current roundlog.v1 schema: " + record.getSchema().getFullName());
        }
        try {
            ByteBuffer buffer = encoder.encode(record);
            byte[] bytes = new byte[buffer.remaining()];
            buffer.get(bytes);
            return bytes;
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    /**
     * The event in {@code value}, in the current schema of its type; empty when it is not a
     * roundlog.v1 event this codec knows (another encoding, an unknown fingerprint, e.g. a future
     * version) or its body is malformed.
     */
    public Optional<GenericRecord> decode(byte[] value) {
        if (value == null || value.length < HEADER_SIZE || value[0] != (byte) 0xC3 || value[1] != 0x01) {
            return Optional.empty();
        }
        long fingerprint = ByteBuffer.wrap(value, 2, 8).order(ByteOrder.LITTLE_ENDIAN).getLong();
        Schema writer = store.findByFingerprint(fingerprint);
        if (writer == null) {
            return Optional.empty();
        }
        ByteArrayInputStream in = new ByteArrayInputStream(value);
        try {
            GenericRecord record = decoders.get(writer.getName()).decode(in, null);
            return in.available() == 0 ? Optional.of(record) : Optional.empty(); // trailing bytes: not one event
        } catch (IOException | AvroRuntimeException | IndexOutOfBoundsException e) {
            return Optional.empty();
        }
    }

    /** The CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form, as single-object encoding uses it. */
    public static long fingerprint(Schema schema) {
        return SchemaNormalization.parsingFingerprint64(schema);
    }

    /** The fingerprint as the 8 bytes of a single-object header (little-endian), in hex. */
    public static String fingerprintHex(Schema schema) {
        byte[] bytes = ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN).putLong(fingerprint(schema)).array();
        return java.util.HexFormat.of().formatHex(bytes);
    }

    /** GenericData whose readers give Strings (not Utf8) and keep a map's order from the wire. */
    private static final class PlainGenericData extends GenericData {
        @Override
        public DatumReader createDatumReader(Schema schema) {
            return new PlainReader(schema, schema, this);
        }

        @Override
        public DatumReader createDatumReader(Schema writer, Schema reader) {
            return new PlainReader(writer, reader, this);
        }
    }

    /** A GenericDatumReader with {@link PlainGenericData}'s choices. */
    public static final class PlainReader extends GenericDatumReader<Object> {
        public PlainReader(Schema writer, Schema reader, GenericData data) {
            super(writer, reader, data);
        }

        /** A reader of {@code schema} with the codec's model, e.g. for Avro's JSON decoder. */
        public PlainReader(Schema schema) {
            this(schema, schema, MODEL);
        }

        @Override
        protected Object readString(Object old, Schema expected, Decoder in) throws IOException {
            return in.readString();
        }

        @Override
        protected Object readString(Object old, Decoder in) throws IOException {
            return in.readString();
        }

        @Override
        protected Object newMap(Object old, int size) {
            return new LinkedHashMap<>(Math.max(16, size * 2));
        }
    }
}
