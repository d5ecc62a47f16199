package dev.roundlog.client;

import dev.roundlog.client.FederatedClient.Prediction;
import dev.roundlog.client.FederatedClient.Training;
import dev.roundlog.client.FederatedClient.Validation;
import dev.roundlog.client.Tensors.NamedArray;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import org.apache.avro.generic.GenericRecord;

/**
 * The deterministic trainer every roundlog client language implements alike, so a test can compute
 * the expected aggregate: training adds {@code offset} to every float array in its own precision,
 * validation reports the mean of the float elements, inference counts elements.
 *
 * <pre>java -jar roundlog-client.jar --client-id java-0 --offset 0.25 --num-examples 120</pre>
 *
 * runs until SIGTERM/SIGINT; the broker and signing come from {@code ROUNDLOG_*} variables
 * ({@link Settings}); the flags may also be given as ROUNDLOG_CLIENT_ID, ROUNDLOG_OFFSET and
 * ROUNDLOG_NUM_EXAMPLES.
 */
public final class Trainer implements FederatedClient.Handler {
    private final double offset;
    private final long numExamples;

    public Trainer(double offset, long numExamples) {
        this.offset = offset;
        this.numExamples = numExamples;
    }

    /** Every float array becomes base + offset (float32 sums rounded to float32); other arrays are kept. */
    @Override
    public Training train(List<NamedArray> model, GenericRecord config) {
        List<NamedArray> out = new ArrayList<>();
        for (NamedArray array : model) {
            String dtype = array.dtype().typestr();
            byte[] data = array.data().clone();
            ByteBuffer buffer = ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN);
            if (dtype.equals("<f4")) {
                float x = (float) offset;
                for (int at = 0; at < data.length; at += 4) {
                    buffer.putFloat(at, buffer.getFloat(at) + x); // float arithmetic: the float32 sum
                }
            } else if (dtype.equals("<f8")) {
                for (int at = 0; at < data.length; at += 8) {
                    buffer.putDouble(at, buffer.getDouble(at) + offset);
                }
            }
            out.add(NamedArray.of(array.name(), dtype, array.spec().shape(), data));
        }
        Map<String, Double> metrics = new LinkedHashMap<>();
        metrics.put("loss", 1.0 / (1.0 + Math.abs(offset)));
        metrics.put("offset", offset);
        return new Training(out, numExamples, metrics);
    }

    /** The mean of all elements of all float arrays (as doubles; 0 when there are none) and a fixed accuracy. */
    @Override
    public Validation validate(List<NamedArray> model, GenericRecord config) {
        double sum = 0;
        long count = 0;
        for (NamedArray array : model) {
            ByteBuffer buffer = ByteBuffer.wrap(array.data()).order(ByteOrder.LITTLE_ENDIAN);
            switch (array.dtype().typestr()) {
                case "<f4" -> {
                    for (int at = 0; at < array.data().length; at += 4, count++) {
                        sum += buffer.getFloat(at);
                    }
                }
                case "<f8" -> {
                    for (int at = 0; at < array.data().length; at += 8, count++) {
                        sum += buffer.getDouble(at);
                    }
                }
                default -> { }
            }
        }
        Map<String, Double> metrics = new LinkedHashMap<>();
        metrics.put("mean", count == 0 ? 0.0 : sum / count);
        metrics.put("accuracy", 0.5);
        return new Validation(numExamples, metrics);
    }

    @Override
    public Prediction predict(List<NamedArray> model, GenericRecord config) {
        long elements = 0;
        for (NamedArray array : model) {
            elements += array.spec().count();
        }
        return new Prediction("arrays=" + model.size(), Map.of("elements", (double) elements));
    }

    public static void main(String[] args) throws Exception {
        Map<String, String> options = new LinkedHashMap<>();
        options.put("--client-id", System.getenv("ROUNDLOG_CLIENT_ID"));
        options.put("--offset", System.getenv().getOrDefault("ROUNDLOG_OFFSET", "0"));
        options.put("--num-examples", System.getenv().getOrDefault("ROUNDLOG_NUM_EXAMPLES", "100"));
        for (int i = 0; i < args.length; i++) {
            String arg = args[i];
            String name = arg.contains("=") ? arg.substring(0, arg.indexOf('=')) : arg;
            if (arg.equals("-h") || arg.equals("--help")) {
                System.out.println("usage: roundlog-client --client-id ID [--offset X] [--num-examples N]");
                return;
            }
            if (!options.containsKey(name)) {
                usage("unknown option " + arg);
            }
            if (arg.contains("=")) {
                options.put(name, arg.substring(arg.indexOf('=') + 1));
            } else if (i + 1 < args.length) {
                options.put(name, args[++i]);
            } else {
                usage(name + " needs a value");
            }
        }
        String clientId = options.get("--client-id");
        if (clientId == null || clientId.isEmpty()) {
            usage("--client-id is required");
        }
        double offset = 0;
        long numExamples = 0;
        try {
            offset = Double.parseDouble(options.get("--offset"));
            numExamples = Long.parseLong(options.get("--num-examples"));
        } catch (NumberFormatException e) {
            usage("--offset must be a number and --num-examples an integer: " + e.getMessage());
        }

        FederatedClient client = new FederatedClient(
                Settings.fromEnv(), clientId, new Trainer(offset, numExamples), Map.of("language", "java"));
        CountDownLatch finished = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            client.stop(); // SIGTERM/SIGINT: finish the answers under way, then leave
            try {
                finished.await();
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }, "roundlog-shutdown"));
        try {
            client.run();
        } finally {
            finished.countDown();
        }
    }

    private static void usage(String problem) {
        System.err.println("roundlog-client: " + problem);
        System.err.println("usage: roundlog-client --client-id ID [--offset X] [--num-examples N]");
        System.exit(2);
    }
}
