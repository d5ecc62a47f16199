/**
 * Settings from the environment, named and defaulted as in the Python SDK (roundlog.config).
 *
 * - ROUNDLOG_KAFKA_BOOTSTRAP: comma-separated host:port list (default 127.0.0.1:9092)
 * - ROUNDLOG_TOPIC_PREFIX: topic prefix (default "roundlog")
 * - ROUNDLOG_AUTH: "off" or "signed" (default off)
 * - ROUNDLOG_KEY_FILE: this client's Ed25519 PKCS#8 PEM private key; events are signed whenever it is set
 * - ROUNDLOG_SCHEMAS_DIR: where the .avsc files live (default: ../../schemas from this package)
 * - ROUNDLOG_GROUP_SESSION_TIMEOUT_MS: session timeout of the client's (throwaway) consumer
 *   groups (default 6000; Tansu delays each group's first join by half of it)
 */

export interface Settings {
  /** Kafka bootstrap servers, each "host:port". */
  readonly bootstrap: string[];
  readonly topicPrefix: string;
  /** True when ROUNDLOG_AUTH=signed: every event must be signed and assignments are verified. */
  readonly auth: boolean;
  /** Path of the private key file, or undefined. */
  readonly keyFile: string | undefined;
  /** Session timeout of the consumers' groups, in ms. */
  readonly groupSessionTimeoutMs: number;
}

export class ConfigError extends Error {
  override name = "ConfigError";
}

/** The settings in `env` (process.env by default); throws ConfigError on a malformed value. */
export function settingsFromEnv(env: NodeJS.ProcessEnv = process.env): Settings {
  const bootstrap = (env.ROUNDLOG_KAFKA_BOOTSTRAP ?? "127.0.0.1:9092")
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s.length > 0);
  if (bootstrap.length === 0) {
    throw new ConfigError("ROUNDLOG_KAFKA_BOOTSTRAP is empty");
  }
  const topicPrefix = (env.ROUNDLOG_TOPIC_PREFIX ?? "roundlog").trim() || "roundlog";
  const authValue = (env.ROUNDLOG_AUTH ?? "off").trim().toLowerCase() || "off";
  if (authValue !== "off" && authValue !== "signed") {
    throw new ConfigError(`ROUNDLOG_AUTH must be "off" or "signed", not ${JSON.stringify(env.ROUNDLOG_AUTH)}`);
  }
  const keyFile = env.ROUNDLOG_KEY_FILE?.trim() || undefined;
  if (authValue === "signed" && keyFile === undefined) {
    throw new ConfigError("ROUNDLOG_AUTH=signed: set ROUNDLOG_KEY_FILE to this client's key");
  }
  const timeoutText = env.ROUNDLOG_GROUP_SESSION_TIMEOUT_MS?.trim() || "6000";
  const groupSessionTimeoutMs = Number(timeoutText);
  if (!Number.isInteger(groupSessionTimeoutMs) || groupSessionTimeoutMs < 1000) {
    throw new ConfigError(`ROUNDLOG_GROUP_SESSION_TIMEOUT_MS must be a whole number of ms >= 1000, not ${timeoutText}`);
  }
  return { bootstrap, topicPrefix, auth: authValue === "signed", keyFile, groupSessionTimeoutMs };
}

/** The topic names under one prefix. */
export interface Topics {
  readonly events: string;
  readonly tensors: string;
  readonly clients: string;
}

export function topicsFor(prefix: string): Topics {
  return { events: `${prefix}.events`, tensors: `${prefix}.tensors`, clients: `${prefix}.clients` };
}
