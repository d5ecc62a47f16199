package dev.roundlog.client;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.GeneralSecurityException;
import java.security.KeyFactory;
import java.security.PrivateKey;
import java.security.PublicKey;
import java.security.Signature;
import java.security.interfaces.EdECPrivateKey;
import java.security.spec.PKCS8EncodedKeySpec;
import java.security.spec.X509EncodedKeySpec;
import java.util.Base64;
import java.util.HexFormat;
import java.util.List;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.Headers;
import org.apache.kafka.common.header.internals.RecordHeader;
import org.bouncycastle.crypto.params.Ed25519PrivateKeyParameters;

/**
 * Signs event records as one Ed25519 key, and checks other records' signatures.
 *
 * <p>A signature covers {@code "roundlog.v1 event\n" + keyId + "\n" + value}, where the key id is
 * the raw 32-byte public key in lowercase hex. Signed records carry the key id (ASCII) in header
 * {@code roundlog-key} and the 64-byte signature in {@code roundlog-signature}. The JDK signs and
 * verifies; BouncyCastle only derives the public key from the private one.
 */
public final class Signer {
    public static final byte[] CONTEXT = "roundlog.v1 event\n".getBytes(StandardCharsets.US_ASCII);
    public static final String KEY_HEADER = "roundlog-key";
    public static final String SIGNATURE_HEADER = "roundlog-signature";

    /** DER prefixes that wrap a raw 32-byte Ed25519 seed (PKCS#8) or public key (X.509 SubjectPublicKeyInfo). */
    private static final byte[] PKCS8_PREFIX = HexFormat.of().parseHex("302e020100300506032b657004220420");
    private static final byte[] X509_PREFIX = HexFormat.of().parseHex("302a300506032b6570032100");

    private final PrivateKey privateKey;
    private final String keyId;

    private Signer(PrivateKey privateKey) {
        this.privateKey = privateKey;
        byte[] seed = ((EdECPrivateKey) privateKey).getBytes()
                .orElseThrow(() -> new IllegalArgumentException("the private key does not expose its seed"));
        this.keyId = HexFormat.of().formatHex(new Ed25519PrivateKeyParameters(seed, 0).generatePublicKey().getEncoded());
    }

    /** The signer of a PEM file holding an unencrypted PKCS#8 Ed25519 private key ({@code ROUNDLOG_KEY_FILE}). */
    public static Signer fromPemFile(Path path) throws IOException {
        return fromPem(Files.readString(path, StandardCharsets.US_ASCII));
    }

    /** The signer of PEM text ({@code -----BEGIN PRIVATE KEY-----} ...). */
    public static Signer fromPem(String pem) {
        String begin = "-----BEGIN PRIVATE KEY-----";
        String end = "-----END PRIVATE KEY-----";
        int from = pem.indexOf(begin);
        int to = pem.indexOf(end);
        if (from < 0 || to < from) {
            throw new IllegalArgumentException("not an unencrypted PKCS#8 PEM private key (BEGIN PRIVATE KEY)");
        }
        byte[] der = Base64.getMimeDecoder().decode(pem.substring(from + begin.length(), to));
        return fromPkcs8(der);
    }

    /** The signer of a DER-encoded PKCS#8 Ed25519 private key. */
    public static Signer fromPkcs8(byte[] der) {
        try {
            return new Signer(KeyFactory.getInstance("Ed25519").generatePrivate(new PKCS8EncodedKeySpec(der)));
        } catch (GeneralSecurityException | ClassCastException e) {
            throw new IllegalArgumentException("not an Ed25519 PKCS#8 private key: " + e.getMessage(), e);
        }
    }

    /** The signer of a raw 32-byte Ed25519 seed (RFC 8032 private key). */
    public static Signer fromSeed(byte[] seed) {
        if (seed.length != 32) {
            throw new IllegalArgumentException("an Ed25519 seed is 32 bytes, not " + seed.length);
        }
        return fromPkcs8(concat(PKCS8_PREFIX, seed));
    }

    /** The raw public key in lowercase hex (64 digits): the key id. */
    public String keyId() {
        return keyId;
    }

    /** The bytes an author signs for a record whose value is {@code value}. */
    public static byte[] message(String keyId, byte[] value) {
        return concat(CONTEXT, keyId.getBytes(StandardCharsets.US_ASCII), new byte[] {'\n'}, value);
    }

    /** The 64-byte signature of a record value. */
    public byte[] sign(byte[] value) {
        try {
            Signature signature = Signature.getInstance("Ed25519");
            signature.initSign(privateKey);
            signature.update(message(keyId, value));
            return signature.sign();
        } catch (GeneralSecurityException e) {
            throw new IllegalStateException("Ed25519 signing failed", e);
        }
    }

    /** The headers that sign a record whose value is {@code value}. */
    public List<Header> headers(byte[] value) {
        return List.of(
                new RecordHeader(KEY_HEADER, keyId.getBytes(StandardCharsets.US_ASCII)),
                new RecordHeader(SIGNATURE_HEADER, sign(value)));
    }

    /** Whether {@code signature} over {@code value} verifies with the key {@code keyId} names. */
    public static boolean verify(String keyId, byte[] signature, byte[] value) {
        if (keyId.length() != 64 || !keyId.chars().allMatch(c -> Character.digit(c, 16) >= 0) || signature.length != 64) {
            return false;
        }
        try {
            PublicKey publicKey = KeyFactory.getInstance("Ed25519")
                    .generatePublic(new X509EncodedKeySpec(concat(X509_PREFIX, HexFormat.of().parseHex(keyId))));
            Signature verifier = Signature.getInstance("Ed25519");
            verifier.initVerify(publicKey);
            verifier.update(message(keyId, value));
            return verifier.verify(signature);
        } catch (GeneralSecurityException | IllegalArgumentException e) {
            return false; // not a point on the curve, a malformed signature: it does not hold
        }
    }

    /** Whether a record's signature headers hold for its value; a record without them does not. */
    public static boolean verify(Headers headers, byte[] value) {
        Header key = headers.lastHeader(KEY_HEADER);
        Header signature = headers.lastHeader(SIGNATURE_HEADER);
        if (key == null || signature == null || key.value() == null || signature.value() == null || value == null) {
            return false;
        }
        return verify(new String(key.value(), StandardCharsets.US_ASCII), signature.value(), value);
    }

    private static byte[] concat(byte[]... parts) {
        int size = 0;
        for (byte[] part : parts) {
            size += part.length;
        }
        byte[] out = new byte[size];
        int at = 0;
        for (byte[] part : parts) {
            System.arraycopy(part, 0, out, at, part.length);
            at += part.length;
        }
        return out;
    }
}
