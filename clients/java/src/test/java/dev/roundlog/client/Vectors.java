package dev.roundlog.client;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.file.Path;
import java.util.HexFormat;

/** The shared test vectors of the repository, read where they are: ../../schemas/vectors. */
final class Vectors {
    static final Path DIR = Path.of("..", "..", "schemas", "vectors");
    static final ObjectMapper JSON = new ObjectMapper();
    static final HexFormat HEX = HexFormat.of();

    private Vectors() {}

    static JsonNode load(String name) {
        try {
            return JSON.readTree(DIR.resolve(name).toFile());
        } catch (IOException e) {
            throw new UncheckedIOException("reading vector file " + name, e);
        }
    }

    static byte[] hex(JsonNode node) {
        return HEX.parseHex(node.asText());
    }
}
