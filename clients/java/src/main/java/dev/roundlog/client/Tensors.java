package dev.roundlog.client;

import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.Future;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.kafka.clients.consumer.Consumer;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.producer.Producer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.internals.RecordHeader;

/**
 * Arrays over the tensors topic. A blob (a model or an update) is each array's raw little-endian
 * C-order bytes, concatenated in order, cut into records of at most {@link #CHUNK_BYTES}, all keyed
 * by the blob's key on one partition, each with its sequence number in header {@code roundlog-chunk}.
 * A {@link TensorRef} says where the records are and how to check them.
 */
public final class Tensors {
    /** Payload bytes per record: the most the contract allows (1 MiB). */
    public static final int CHUNK_BYTES = 1 << 20;
    public static final String SEQ_HEADER = "roundlog-chunk";
    /** How long a reader waits for a chunk the broker should already have before calling the stream incomplete. */
    public static final Duration CHUNK_WAIT = Duration.ofSeconds(10);

    private Tensors() {}

    /** Why a stream of arrays cannot be used. */
    public static final class TensorException extends RuntimeException {
        public TensorException(String message) {
            super(message);
        }
    }

    /** An element type a stream may carry, by numpy type string. */
    public record DType(String typestr, int itemsize, char kind) {
        public boolean isFloat() {
            return kind == 'f';
        }
    }

    private static final Map<String, DType> SPELLINGS = new LinkedHashMap<>();

    static {
        Object[][] table = {
            {"|b1", "bool"}, {"|i1", "int8"}, {"<i2", "int16"}, {"<i4", "int32"}, {"<i8", "int64"},
            {"|u1", "uint8"}, {"<u2", "uint16"}, {"<u4", "uint32"}, {"<u8", "uint64"},
            {"<f2", "float16"}, {"<f4", "float32"}, {"<f8", "float64"}, {"<c8", "complex64"}, {"<c16", "complex128"},
        };
        for (Object[] row : table) {
            String typestr = (String) row[0];
            DType dtype = new DType(typestr, Integer.parseInt(typestr.substring(2)), typestr.charAt(1));
            SPELLINGS.put(typestr, dtype); // what roundlog writes
            SPELLINGS.put(typestr.substring(1), dtype); // without the byte-order mark
            SPELLINGS.put((String) row[1], dtype); // numpy's name
        }
    }

    /** The dtype a spelling names ({@code "<f4"}, {@code "f4"} and {@code "float32"} are one); big-endian is none. */
    public static DType dtype(String spelling) {
        DType dtype = SPELLINGS.get(spelling);
        if (dtype == null) {
            throw new TensorException("unknown dtype '" + spelling + "': one of <f4, <f8, <i8, |u1, |b1, ... (or its name)");
        }
        return dtype;
    }

    /** Name, dtype spelling and shape of one array. */
    public record ArraySpec(String name, String dtype, List<Long> shape) {
        /** Elements the shape holds (1 for a scalar, shape {@code []}). */
        public long count() {
            long count = 1;
            for (long d : shape) {
                if (d < 0) {
                    throw new TensorException(name + ": negative dimension in " + shape);
                }
                count = Math.multiplyExact(count, d);
            }
            return count;
        }

        public long nbytes() {
            return Math.multiplyExact(count(), Tensors.dtype(dtype).itemsize());
        }
    }

    /** One named array: its spec and its raw little-endian C-order bytes. */
    public record NamedArray(ArraySpec spec, byte[] data) {
        public NamedArray {
            if (data.length != spec.nbytes()) {
                throw new TensorException(spec.name() + ": " + data.length + " bytes, its shape and dtype hold " + spec.nbytes());
            }
        }

        public static NamedArray of(String name, String dtype, List<Long> shape, byte[] data) {
            return new NamedArray(new ArraySpec(name, dtype, shape), data);
        }

        public String name() {
            return spec.name();
        }

        public DType dtype() {
            return Tensors.dtype(spec.dtype());
        }
    }

    /** Where the chunks of one blob live on the tensors topic (Avro record {@code roundlog.v1.TensorRef}). */
    public record TensorRef(String key, int partition, long firstOffset, long lastOffset, long chunks, long nbytes,
            String sha256, List<ArraySpec> arrays) {

        public static TensorRef fromAvro(GenericRecord record) {
            List<ArraySpec> specs = new ArrayList<>();
            for (Object item : (List<?>) record.get("arrays")) {
                GenericRecord spec = (GenericRecord) item;
                List<Long> shape = new ArrayList<>();
                for (Object d : (List<?>) spec.get("shape")) {
                    shape.add((Long) d);
                }
                specs.add(new ArraySpec(spec.get("name").toString(), spec.get("dtype").toString(), List.copyOf(shape)));
            }
            return new TensorRef(record.get("key").toString(), Math.toIntExact((Long) record.get("partition")),
                    (Long) record.get("first_offset"), (Long) record.get("last_offset"), (Long) record.get("chunks"),
                    (Long) record.get("nbytes"), record.get("sha256").toString(), List.copyOf(specs));
        }

        /** This reference as a record of {@code schema} (the TensorRef schema of some event). */
        public GenericRecord toAvro(Schema schema) {
            Schema specSchema = schema.getField("arrays").schema().getElementType();
            List<GenericRecord> specs = new ArrayList<>();
            for (ArraySpec spec : arrays) {
                GenericRecord r = new GenericData.Record(specSchema);
                r.put("name", spec.name());
                r.put("dtype", spec.dtype());
                r.put("shape", new ArrayList<>(spec.shape()));
                specs.add(r);
            }
            GenericRecord r = new GenericData.Record(schema);
            r.put("key", key);
            r.put("partition", (long) partition);
            r.put("first_offset", firstOffset);
            r.put("last_offset", lastOffset);
            r.put("chunks", chunks);
            r.put("nbytes", nbytes);
            r.put("sha256", sha256);
            r.put("arrays", specs);
            return r;
        }

        /** Why this reference cannot point at a readable stream of its arrays, or null (as roundlog's fold checks it). */
        public String problem() {
            if (key.isEmpty()) {
                return "empty key";
            }
            if (partition < 0 || firstOffset < 0 || firstOffset > lastOffset) {
                return "partition " + partition + ", offsets " + firstOffset + ".." + lastOffset;
            }
            if (chunks < 1 || chunks > lastOffset - firstOffset + 1) {
                return chunks + " chunks in " + (lastOffset - firstOffset + 1) + " offsets";
            }
            if (!sha256.matches("[0-9a-fA-F]{64}")) {
                return "sha256 is not 64 hex digits";
            }
            if (new HashSet<>(arrays.stream().map(ArraySpec::name).toList()).size() != arrays.size()) {
                return "array names repeat";
            }
            long declared;
            try {
                declared = declaredNbytes(arrays);
            } catch (TensorException | ArithmeticException e) {
                return e.getMessage();
            }
            if (nbytes != declared) {
                return "nbytes " + nbytes + ", the arrays hold " + declared;
            }
            if (chunks < (nbytes + CHUNK_BYTES - 1) / CHUNK_BYTES) {
                return nbytes + " bytes cannot fit " + chunks + " chunks of at most " + CHUNK_BYTES;
            }
            return null;
        }
    }

    /** Bytes the arrays of {@code specs} hold. */
    public static long declaredNbytes(List<ArraySpec> specs) {
        long total = 0;
        for (ArraySpec spec : specs) {
            total = Math.addExact(total, spec.nbytes());
        }
        return total;
    }

    /** The specs of {@code arrays}, with dtypes in the spelling roundlog writes ({@code "<f4"}, {@code "|u1"}). */
    public static List<ArraySpec> specsOf(List<NamedArray> arrays) {
        List<ArraySpec> specs = new ArrayList<>();
        for (NamedArray a : arrays) {
            specs.add(new ArraySpec(a.name(), a.dtype().typestr(), a.spec().shape()));
        }
        return specs;
    }

    /** The raw byte stream of {@code arrays} cut into chunks of {@code chunkBytes} (the last may be shorter; an empty stream is one empty chunk). */
    public static List<byte[]> chunks(List<NamedArray> arrays, int chunkBytes) {
        if (chunkBytes < 1) {
            throw new IllegalArgumentException("chunkBytes must be positive, not " + chunkBytes);
        }
        long total = 0;
        for (NamedArray a : arrays) {
            total += a.data().length;
        }
        List<byte[]> chunks = new ArrayList<>();
        byte[] chunk = new byte[(int) Math.min(chunkBytes, total)];
        int filled = 0;
        long left = total;
        for (NamedArray a : arrays) {
            int pos = 0;
            while (pos < a.data().length) {
                int take = Math.min(chunk.length - filled, a.data().length - pos);
                System.arraycopy(a.data(), pos, chunk, filled, take);
                pos += take;
                filled += take;
                if (filled == chunk.length) {
                    chunks.add(chunk);
                    left -= filled;
                    chunk = new byte[(int) Math.min(chunkBytes, left)];
                    filled = 0;
                }
            }
        }
        if (chunks.isEmpty()) {
            chunks.add(new byte[0]);
        }
        return chunks;
    }

    /** Hex sha256 of the raw byte stream. */
    public static String sha256(List<NamedArray> arrays) {
        MessageDigest digest = sha256Digest();
        for (NamedArray a : arrays) {
            digest.update(a.data());
        }
        return HexFormat.of().formatHex(digest.digest());
    }

    /** The {@code roundlog-chunk} header of chunk {@code seq}. */
    public static Header seqHeader(int seq) {
        return new RecordHeader(SEQ_HEADER, Integer.toString(seq).getBytes(StandardCharsets.US_ASCII));
    }

    /**
     * Send the arrays' byte stream as chunks keyed {@code key} to one partition of {@code topic}, and
     * say where they landed (offsets from the produce acknowledgements).
     */
    public static TensorRef write(Producer<byte[], byte[]> producer, String topic, int partition, String key,
            List<NamedArray> arrays) throws InterruptedException, ExecutionException {
        List<byte[]> chunks = chunks(arrays, CHUNK_BYTES);
        byte[] keyBytes = key.getBytes(StandardCharsets.UTF_8);
        List<Future<RecordMetadata>> sent = new ArrayList<>();
        long nbytes = 0;
        for (int seq = 0; seq < chunks.size(); seq++) {
            sent.add(producer.send(new ProducerRecord<>(topic, partition, keyBytes, chunks.get(seq), List.of(seqHeader(seq)))));
            nbytes += chunks.get(seq).length;
        }
        RecordMetadata first = sent.get(0).get();
        RecordMetadata last = first;
        for (Future<RecordMetadata> future : sent) {
            last = future.get();
        }
        return new TensorRef(key, first.partition(), first.offset(), last.offset(), chunks.size(), nbytes,
                sha256(arrays), specsOf(arrays));
    }

    /**
     * Whole arrays from a blob's chunks, in order: every byte the specs declare, no more, hash-checked
     * against {@code sha256}.
     */
    public static List<NamedArray> assemble(List<ArraySpec> specs, Iterable<byte[]> chunks, String sha256) {
        List<byte[]> buffers = new ArrayList<>();
        for (ArraySpec spec : specs) {
            long n = spec.nbytes();
            if (n > Integer.MAX_VALUE - 8) {
                throw new TensorException(spec.name() + ": " + n + " bytes are more than one Java array holds");
            }
            buffers.add(new byte[(int) n]);
        }
        MessageDigest digest = sha256Digest();
        int index = 0;
        int filled = 0;
        long received = 0;
        for (byte[] chunk : chunks) {
            digest.update(chunk);
            received += chunk.length;
            int pos = 0;
            while (pos < chunk.length) {
                while (index < buffers.size() && filled == buffers.get(index).length) {
                    index++;
                    filled = 0;
                }
                if (index == buffers.size()) {
                    throw new TensorException("overflow: the stream has more bytes than the arrays declare");
                }
                byte[] buffer = buffers.get(index);
                int take = Math.min(buffer.length - filled, chunk.length - pos);
                System.arraycopy(chunk, pos, buffer, filled, take);
                pos += take;
                filled += take;
            }
        }
        long declared = declaredNbytes(specs);
        if (received < declared) {
            throw new TensorException("incomplete: " + received + " of " + declared + " bytes received");
        }
        String actual = HexFormat.of().formatHex(digest.digest());
        if (!actual.equalsIgnoreCase(sha256)) {
            throw new TensorException("hash_mismatch: sha256 of the stream is " + actual + ", expected " + sha256);
        }
        List<NamedArray> arrays = new ArrayList<>();
        for (int i = 0; i < specs.size(); i++) {
            arrays.add(new NamedArray(specs.get(i), buffers.get(i)));
        }
        return arrays;
    }

    /**
     * Read the blob {@code ref} names from {@code topic} through a group-less consumer this reader may
     * re-assign and seek at will: records between the first and last offset whose key is the blob's,
     * with consecutive chunk numbers from 0, {@code chunks} of them, {@code nbytes} in all, matching
     * the sha256. Anything else is a {@link TensorException}.
     */
    public static List<NamedArray> read(Consumer<byte[], byte[]> consumer, String topic, TensorRef ref) {
        String problem = ref.problem();
        if (problem != null) {
            throw new TensorException("incomplete: tensors of " + ref.key() + ": " + problem);
        }
        TopicPartition tp = new TopicPartition(topic, ref.partition());
        int partitions = consumer.partitionsFor(topic).size();
        if (ref.partition() >= partitions) {
            throw new TensorException("incomplete: " + topic + " has no partition " + ref.partition());
        }
        consumer.assign(List.of(tp));
        consumer.seek(tp, ref.firstOffset());
        byte[] key = ref.key().getBytes(StandardCharsets.UTF_8);
        List<byte[]> chunks = new ArrayList<>();
        long position = ref.firstOffset();
        long lastRecordAt = System.nanoTime();
        while (position <= ref.lastOffset()) {
            List<ConsumerRecord<byte[], byte[]>> records = consumer.poll(Duration.ofMillis(250)).records(tp);
            if (!records.isEmpty() && records.get(0).offset() < position) {
                // the broker called the offset out of range and the consumer reset: go back and wait
                consumer.seek(tp, position);
                records = List.of();
            }
            if (records.isEmpty()) {
                if (System.nanoTime() - lastRecordAt > CHUNK_WAIT.toNanos()) {
                    throw new TensorException("incomplete: tensors of " + ref.key() + ": no record at offset " + position);
                }
                continue;
            }
            lastRecordAt = System.nanoTime();
            for (ConsumerRecord<byte[], byte[]> record : records) {
                if (record.offset() > ref.lastOffset()) {
                    position = record.offset();
                    break;
                }
                position = record.offset() + 1;
                if (!java.util.Arrays.equals(record.key(), key)) {
                    continue; // another blob's chunk, interleaved
                }
                Header header = record.headers().lastHeader(SEQ_HEADER);
                String seq = header == null || header.value() == null ? "?" : new String(header.value(), StandardCharsets.US_ASCII);
                if (!seq.equals(Integer.toString(chunks.size()))) {
                    throw new TensorException("incomplete: tensors of " + ref.key() + ": chunk " + seq + " where " + chunks.size() + " belongs");
                }
                if (record.value() == null) {
                    throw new TensorException("incomplete: tensors of " + ref.key() + ": chunk " + seq + " has no value");
                }
                chunks.add(record.value());
            }
        }
        if (chunks.size() != ref.chunks()) {
            throw new TensorException("incomplete: tensors of " + ref.key() + ": " + chunks.size() + " of " + ref.chunks() + " chunks found");
        }
        long total = chunks.stream().mapToLong(c -> c.length).sum();
        if (total != ref.nbytes()) {
            throw new TensorException("incomplete: tensors of " + ref.key() + ": " + total + " bytes, the reference says " + ref.nbytes());
        }
        return assemble(ref.arrays(), chunks, ref.sha256());
    }

    private static MessageDigest sha256Digest() {
        try {
            return MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException("SHA-256 is required of every JDK", e);
        }
    }
}
