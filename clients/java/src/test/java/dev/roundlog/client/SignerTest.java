package dev.roundlog.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.fasterxml.jackson.databind.JsonNode;
import java.nio.charset.StandardCharsets;
import java.util.Base64;
import org.apache.kafka.common.header.internals.RecordHeaders;
import org.junit.jupiter.api.Test;

/** signatures.json: the fixed seed's key id, the signed message and the signature header. */
class SignerTest {
    static final JsonNode VECTORS = Vectors.load("signatures.json");
    static final Signer SIGNER = Signer.fromSeed(Vectors.hex(VECTORS.get("private_key_seed")));

    @Test
    void keyIdAndHeaderNames() {
        assertEquals(VECTORS.get("key_id").asText(), SIGNER.keyId());
        assertEquals(VECTORS.get("key_header").asText(), Signer.KEY_HEADER);
        assertEquals(VECTORS.get("signature_header").asText(), Signer.SIGNATURE_HEADER);
        assertArrayEquals(VECTORS.get("context").asText().getBytes(StandardCharsets.US_ASCII), Signer.CONTEXT);
    }

    @Test
    void signingGivesTheExactSignatures() {
        for (JsonNode vector : VECTORS.get("cases")) {
            byte[] value = Vectors.hex(vector.get("value"));
            JsonNode headers = vector.get("headers");
            assertArrayEquals(Vectors.hex(vector.get("signed_message")), Signer.message(SIGNER.keyId(), value));
            assertArrayEquals(Vectors.hex(headers.get(Signer.SIGNATURE_HEADER)), SIGNER.sign(value), vector.get("type").asText());

            RecordHeaders sent = new RecordHeaders(SIGNER.headers(value));
            assertEquals(headers.get(Signer.KEY_HEADER).asText(),
                    new String(sent.lastHeader(Signer.KEY_HEADER).value(), StandardCharsets.US_ASCII));
            assertTrue(Signer.verify(sent, value));
            byte[] tampered = value.clone();
            tampered[tampered.length - 1] ^= 1;
            assertFalse(Signer.verify(sent, tampered), "a changed value");
            assertFalse(Signer.verify(new RecordHeaders(), value), "no headers");
        }
    }

    @Test
    void aPkcs8PemFileLoads() {
        byte[] der = Vectors.HEX.parseHex("302e020100300506032b657004220420" + VECTORS.get("private_key_seed").asText());
        String pem = "-----BEGIN PRIVATE KEY-----\n" + Base64.getMimeEncoder().encodeToString(der) + "\n-----END PRIVATE KEY-----\n";
        assertEquals(VECTORS.get("key_id").asText(), Signer.fromPem(pem).keyId());
    }
}
