package dev.roundlog.client;

import dev.roundlog.client.Tensors.NamedArray;
import dev.roundlog.client.Tensors.TensorRef;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Properties;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.generic.GenericRecordBuilder;
import org.apache.kafka.clients.CommonClientConfigs;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * One federated client, as roundlog's Python SDK runs one: it heartbeats its roles, waits for the
 * {@code ClientsAssigned} that names it, fetches the round's model from the tensors topic, runs the
 * {@link Handler} for the round's task and answers with an event whose ids are deterministic.
 *
 * <p>{@link #run()} blocks until {@link #stop()}; work already started is finished first. The poll
 * loop runs on the caller's thread, heartbeats on their own, and answers one at a time on a worker.
 */
public final class FederatedClient {
    private static final Logger log = LoggerFactory.getLogger("roundlog.client");

    /** Largest record (chunk + key + headers) and largest producer batch roundlog writes. */
    static final int MAX_RECORD_BYTES = 2 * 1024 * 1024;
    /** A topic's max.message.bytes as roundlog creates it. */
    static final int TOPIC_MAX_MESSAGE_BYTES = MAX_RECORD_BYTES + 64 * 1024;
    static final Duration POLL = Duration.ofMillis(200);

    /** What a training function returns: the updated arrays (same names, dtypes, shapes), the example count that weighs them, metrics. */
    public record Training(List<NamedArray> arrays, long numExamples, Map<String, Double> metrics) {}

    /** What a validation function returns. */
    public record Validation(long numExamples, Map<String, Double> metrics) {}

    /** What an inference function returns. */
    public record Prediction(String summary, Map<String, Double> metrics) {}

    /** The client's work; {@code config} is the round's RoundConfig record. */
    public interface Handler {
        Training train(List<NamedArray> model, GenericRecord config);

        Validation validate(List<NamedArray> model, GenericRecord config);

        Prediction predict(List<NamedArray> model, GenericRecord config);
    }

    private final Settings settings;
    private final String clientId;
    private final Handler handler;
    private final Map<String, String> labels;
    private final Duration heartbeatEvery;
    private final Codec codec = Codec.load();
    private final Optional<Signer> signer;
    private final Set<String> answered = new HashSet<>();
    private volatile boolean stopping;
    private final AtomicReference<Throwable> heartbeatFailure = new AtomicReference<>();

    public FederatedClient(Settings settings, String clientId, Handler handler, Map<String, String> labels) throws IOException {
        this(settings, clientId, handler, labels, Duration.ofSeconds(2));
    }

    public FederatedClient(Settings settings, String clientId, Handler handler, Map<String, String> labels,
            Duration heartbeatEvery) throws IOException {
        this.settings = settings;
        this.clientId = clientId;
        this.handler = handler;
        this.labels = Map.copyOf(labels);
        this.heartbeatEvery = heartbeatEvery;
        this.signer = settings.keyFile().isPresent()
                ? Optional.of(Signer.fromPemFile(Path.of(settings.keyFile().get())))
                : Optional.empty();
        if (settings.auth() && signer.isEmpty()) {
            throw new IllegalArgumentException("ROUNDLOG_AUTH=signed needs ROUNDLOG_KEY_FILE");
        }
    }

    /** Ask {@link #run()} to finish: it returns after the answers already started are sent. */
    public void stop() {
        stopping = true;
    }

    /**
     * Connection settings of every client: kafka-clients 4.4 sends the cluster and node id in
     * ApiVersions v5 (KIP-1242) when it connects to a known broker, and Tansu drops such connections;
     * without the check, brokers see ApiVersions as before (Apache Kafka before 4.4 ignores it anyway).
     */
    private static Properties connection(Settings settings, String clientId) {
        Properties p = new Properties();
        p.put(CommonClientConfigs.BOOTSTRAP_SERVERS_CONFIG, settings.kafkaBootstrap());
        p.put(CommonClientConfigs.CLIENT_ID_CONFIG, "roundlog-java-" + clientId);
        p.put(CommonClientConfigs.METADATA_CLUSTER_CHECK_ENABLE_CONFIG, "false");
        return p;
    }

    /** Producer settings every roundlog process agrees on; no idempotence and no transactions (Tansu has no InitProducerId). */
    public static Properties producerConfig(Settings settings, String clientId) {
        Properties p = connection(settings, clientId);
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "false");
        // without idempotence, a retried batch could overtake the next one: keep chunks in order
        p.put(ProducerConfig.MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION, "1");
        p.put(ProducerConfig.MAX_REQUEST_SIZE_CONFIG, Integer.toString(MAX_RECORD_BYTES));
        p.put(ProducerConfig.BATCH_SIZE_CONFIG, Integer.toString(MAX_RECORD_BYTES));
        p.put(ProducerConfig.LINGER_MS_CONFIG, "5");
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        return p;
    }

    /** A group-less consumer that never commits: positions are this client's to set. */
    public static Properties consumerConfig(Settings settings, String clientId) {
        Properties p = connection(settings, clientId);
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        p.put(ConsumerConfig.MAX_PARTITION_FETCH_BYTES_CONFIG, Integer.toString(2 * TOPIC_MAX_MESSAGE_BYTES));
        p.put(ConsumerConfig.FETCH_MAX_BYTES_CONFIG, Integer.toString(64 * 1024 * 1024));
        p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        return p;
    }

    /**
     * Heartbeat and answer assignments until {@link #stop()}. The first heartbeat goes out only once
     * the events topic is read from its end, so no assignment made after the coordinator first sees
     * this client is missed.
     */
    public void run() throws InterruptedException {
        ScheduledExecutorService beats = Executors.newSingleThreadScheduledExecutor(daemon("heartbeat"));
        ExecutorService worker = Executors.newSingleThreadExecutor(daemon("answers"));
        try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(producerConfig(settings, clientId));
                KafkaConsumer<byte[], byte[]> events = new KafkaConsumer<>(consumerConfig(settings, clientId));
                KafkaConsumer<byte[], byte[]> tensors = new KafkaConsumer<>(consumerConfig(settings, clientId))) {
            readFromEnd(events, settings.eventsTopic());
            beats.scheduleWithFixedDelay(() -> heartbeat(producer), 0, heartbeatEvery.toMillis(), TimeUnit.MILLISECONDS);
            log.info("{}: listening on {} (auth {})", clientId, settings.eventsTopic(), settings.auth() ? "signed" : "off");
            try {
                while (!stopping) {
                    Throwable failed = heartbeatFailure.get();
                    if (failed != null) {
                        throw new IllegalStateException("heartbeats failed: the coordinator no longer sees this client", failed);
                    }
                    for (ConsumerRecord<byte[], byte[]> record : events.poll(POLL)) {
                        Optional<GenericRecord> job = assignment(record);
                        if (job.isPresent()) {
                            answered.add(job.get().get("event_id").toString());
                            worker.submit(() -> answer(producer, tensors, job.get()));
                        }
                    }
                }
            } finally {
                beats.shutdownNow();
                worker.shutdown();
                worker.awaitTermination(5, TimeUnit.MINUTES);
            }
        }
        log.info("{}: stopped", clientId);
    }

    /** Assign every partition of {@code topic} and seek each to its true end. */
    static void readFromEnd(KafkaConsumer<byte[], byte[]> consumer, String topic) {
        List<TopicPartition> tps = new ArrayList<>();
        consumer.partitionsFor(topic).forEach(info -> tps.add(new TopicPartition(topic, info.partition())));
        if (tps.isEmpty()) {
            throw new IllegalStateException("topic " + topic + " does not exist: run `roundlog topics create`");
        }
        tps.sort(Comparator.comparingInt(TopicPartition::partition));
        consumer.assign(tps);
        Map<TopicPartition, Long> ends = new HashMap<>(consumer.endOffsets(tps));
        // Tansu answers ListOffsets(latest) with the base offset of the last record batch plus one,
        // short of the end when that batch holds several records. A fetch from there returns the
        // last batch and the real high watermark, so the answer is checked by fetching it.
        Set<TopicPartition> pending = new HashSet<>();
        for (TopicPartition tp : tps) {
            long end = ends.get(tp);
            consumer.seek(tp, Math.max(0, end - 1));
            if (end > 0) {
                pending.add(tp);
            }
        }
        long deadline = System.nanoTime() + Duration.ofSeconds(5).toNanos();
        while (!pending.isEmpty() && System.nanoTime() < deadline) {
            ConsumerRecords<byte[], byte[]> records = consumer.poll(Duration.ofMillis(250));
            for (TopicPartition tp : records.partitions()) {
                long highWatermark = consumer.position(tp) + consumer.currentLag(tp).orElse(0);
                ends.merge(tp, highWatermark, Math::max);
                pending.remove(tp);
            }
        }
        ends.forEach(consumer::seek);
    }

    /** A new assignment of this client in {@code record}, or empty. */
    private Optional<GenericRecord> assignment(ConsumerRecord<byte[], byte[]> record) {
        Optional<GenericRecord> event = codec.decode(record.value());
        if (event.isEmpty() || !event.get().getSchema().getName().equals("ClientsAssigned")) {
            return Optional.empty();
        }
        GenericRecord assigned = event.get();
        boolean named = ((List<?>) assigned.get("client_ids")).stream().anyMatch(id -> clientId.equals(id.toString()));
        if (!named || answered.contains(assigned.get("event_id").toString())) {
            return Optional.empty();
        }
        if (settings.auth() && !Signer.verify(record.headers(), record.value())) {
            log.warn("{}: ignoring an assignment of round {} with no valid signature", clientId, assigned.get("round_id"));
            return Optional.empty();
        }
        return event;
    }

    private void heartbeat(KafkaProducer<byte[], byte[]> producer) {
        try {
            publish(producer, settings.clientsTopic(), clientId, heartbeatEvent());
        } catch (Exception e) {
            heartbeatFailure.compareAndSet(null, e);
        }
    }

    /** A ClientHeartbeat of this client: a trainer and validator, with its labels. */
    GenericRecord heartbeatEvent() {
        Schema schema = codec.schema("ClientHeartbeat");
        Schema role = schema.getField("roles").schema().getElementType();
        return new GenericRecordBuilder(schema)
                .set("event_id", UUID.randomUUID().toString())
                .set("occurred_at", System.currentTimeMillis())
                .set("client_id", clientId)
                .set("roles", List.of(new GenericData.EnumSymbol(role, "trainer"), new GenericData.EnumSymbol(role, "validator")))
                .set("labels", new LinkedHashMap<>(labels))
                .build();
    }

    /** Send an event, signed when this client has a key, to the partition of its key. */
    private void publish(KafkaProducer<byte[], byte[]> producer, String topic, String key, GenericRecord event)
            throws InterruptedException, ExecutionException {
        byte[] value = codec.encode(event);
        int partition = Partitioning.partition(key, producer.partitionsFor(topic).size());
        List<Header> headers = signer.map(s -> s.headers(value)).orElse(List.of());
        producer.send(new ProducerRecord<>(topic, partition, key.getBytes(StandardCharsets.UTF_8), value, headers)).get();
    }

    /** Fetch the round's model, run the handler for its task and submit the result; a failure is logged. */
    private void answer(KafkaProducer<byte[], byte[]> producer, KafkaConsumer<byte[], byte[]> tensors, GenericRecord job) {
        String task = job.get("task").toString();
        String roundId = job.get("round_id").toString();
        try {
            TensorRef modelRef = TensorRef.fromAvro((GenericRecord) job.get("model"));
            List<NamedArray> model = Tensors.read(tensors, settings.tensorsTopic(), modelRef);
            GenericRecord event = result(producer, job, task, model, modelRef.sha256());
            publish(producer, settings.eventsTopic(), job.get("session_id").toString(), event);
            log.info("{}: answered {} round {}", clientId, task, roundId);
        } catch (Exception e) {
            log.error("{}: {} round {} failed", clientId, task, roundId, e);
        }
    }

    private GenericRecord result(KafkaProducer<byte[], byte[]> producer, GenericRecord job, String task,
            List<NamedArray> model, String modelSha256) throws InterruptedException, ExecutionException {
        GenericRecord config = (GenericRecord) job.get("config");
        switch (task) {
            case "training" -> {
                Training trained = handler.train(model, config);
                String updateId = Ids.updateId(job.get("round_id").toString(), clientId);
                int partition = Partitioning.partition(updateId, producer.partitionsFor(settings.tensorsTopic()).size());
                TensorRef ref = Tensors.write(producer, settings.tensorsTopic(), partition, updateId, trained.arrays());
                return updateEvent(job, trained, ref, modelSha256);
            }
            case "validation" -> {
                return validationEvent(job, handler.validate(model, config), modelSha256);
            }
            case "inference" -> {
                return predictionEvent(job, handler.predict(model, config), modelSha256);
            }
            default -> throw new IllegalArgumentException("unknown task " + task);
        }
    }

    /** The fields every answer to {@code job} shares: its deterministic event id, session, round, client and time. */
    private GenericRecordBuilder answer(String type, GenericRecord job, String task) {
        String roundId = job.get("round_id").toString();
        return new GenericRecordBuilder(codec.schema(type))
                .set("event_id", Ids.answerEventId(roundId, clientId, task))
                .set("occurred_at", System.currentTimeMillis())
                .set("session_id", job.get("session_id").toString())
                .set("round_id", roundId)
                .set("client_id", clientId);
    }

    /** UpdateReceived for a training round, pointing at the update's chunks {@code ref}. */
    GenericRecord updateEvent(GenericRecord job, Training trained, TensorRef ref, String modelSha256) {
        Schema schema = codec.schema("UpdateReceived");
        return answer("UpdateReceived", job, "training")
                .set("update_id", Ids.updateId(job.get("round_id").toString(), clientId))
                .set("num_examples", trained.numExamples())
                .set("metrics", new LinkedHashMap<>(trained.metrics()))
                .set("tensor", ref.toAvro(schema.getField("tensor").schema()))
                .set("base_model_sha256", modelSha256)
                .build();
    }

    /** ValidationReceived for a validation round. */
    GenericRecord validationEvent(GenericRecord job, Validation validated, String modelSha256) {
        return answer("ValidationReceived", job, "validation")
                .set("model_id", job.get("model_id").toString())
                .set("num_examples", validated.numExamples())
                .set("metrics", new LinkedHashMap<>(validated.metrics()))
                .set("model_sha256", modelSha256)
                .build();
    }

    /** PredictionReceived for an inference round. */
    GenericRecord predictionEvent(GenericRecord job, Prediction predicted, String modelSha256) {
        return answer("PredictionReceived", job, "inference")
                .set("model_id", job.get("model_id").toString())
                .set("summary", predicted.summary())
                .set("metrics", new LinkedHashMap<>(predicted.metrics()))
                .set("model_sha256", modelSha256)
                .build();
    }

    private static java.util.concurrent.ThreadFactory daemon(String name) {
        return runnable -> {
            Thread thread = new Thread(runnable, "roundlog-" + name);
            thread.setDaemon(true);
            return thread;
        };
    }
}
