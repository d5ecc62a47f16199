package dev.roundlog.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;

import dev.roundlog.client.FederatedClient.Training;
import dev.roundlog.client.Tensors.NamedArray;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.List;
import org.junit.jupiter.api.Test;

/** The deterministic trainer on the vector model: floats move by the offset, everything else stays. */
class TrainerTest {
    final List<NamedArray> model = TensorVectorsTest.arrays();

    @Test
    void trainingAddsTheOffsetToFloatArraysOnly() {
        Training trained = new Trainer(0.25, 120).train(model, null);
        assertEquals(120, trained.numExamples());
        assertEquals(1 / 1.25, trained.metrics().get("loss"));
        assertEquals(0.25, trained.metrics().get("offset"));
        assertEquals(Tensors.specsOf(model), Tensors.specsOf(trained.arrays()));
        ByteBuffer kernel = ByteBuffer.wrap(trained.arrays().get(0).data()).order(ByteOrder.LITTLE_ENDIAN);
        float[] expected = {0.75f, -1.0f, 2.25f, 3.75f, 0.25f, 0.125f};
        for (int i = 0; i < expected.length; i++) {
            assertEquals(expected[i], kernel.getFloat(4 * i));
        }
        ByteBuffer bias = ByteBuffer.wrap(trained.arrays().get(1).data()).order(ByteOrder.LITTLE_ENDIAN);
        assertEquals(1.25, bias.getDouble(0));
        assertEquals(-1.75, bias.getDouble(8));
        assertArrayEquals(model.get(2).data(), trained.arrays().get(2).data(), "int64 unchanged");
        assertArrayEquals(model.get(3).data(), trained.arrays().get(3).data(), "uint8 unchanged");
    }

    @Test
    void float32SumsAreRoundedToFloat32() {
        NamedArray one = NamedArray.of("w", "<f4", List.of(1L),
                ByteBuffer.allocate(4).order(ByteOrder.LITTLE_ENDIAN).putFloat(1.0f).array());
        Training trained = new Trainer(1e-9, 1).train(List.of(one), null);
        assertEquals(1.0f, ByteBuffer.wrap(trained.arrays().get(0).data()).order(ByteOrder.LITTLE_ENDIAN).getFloat(0));
    }

    @Test
    void validationAndInference() {
        var validated = new Trainer(0.25, 50).validate(model, null);
        assertEquals(50, validated.numExamples());
        double sum = 0.5 - 1.25 + 2.0 + 3.5 + 0.0 - 0.125 + 1.0 - 2.0 + 0.25;
        assertEquals(sum / 9, validated.metrics().get("mean"), 1e-15);
        assertEquals(0.5, validated.metrics().get("accuracy"));
        var predicted = new Trainer(0.25, 50).predict(model, null);
        assertEquals("arrays=5", predicted.summary());
        assertEquals(6 + 3 + 1 + 3 + 0, predicted.metrics().get("elements"));
    }
}
