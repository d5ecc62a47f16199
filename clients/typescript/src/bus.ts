/**
 * Kafka plumbing on kafkajs, fixed to what roundlog and its dev broker (Tansu) need:
 *
 * - a producer with acks=-1 (all), no idempotence and no transactions (Tansu has no
 *   InitProducerId), and an explicit partition on every record (Java's murmur2 partitioner);
 * - events signed with the client's key (ROUNDLOG_KEY_FILE) whenever one is set;
 * - consumers that read given partitions from given offsets. kafkajs only consumes through a
 *   consumer group, so each one joins a throwaway group of its own (a fresh random id, never
 *   committed to), seeks every assigned partition to its position when the group is joined
 *   (again after any rejoin, to where it had got) and pauses the partitions it does not read.
 */

import { randomUUID } from "node:crypto";
import {
  Kafka,
  logLevel as KafkaLogLevel,
  type Admin,
  type Batch,
  type Consumer,
  type IHeaders,
  type KafkaMessage,
  type LogEntry,
  type Producer,
} from "kafkajs";
import { encode } from "./codec.js";
import { partitionFor } from "./partitioning.js";
import { ConfigError, topicsFor, type Settings, type Topics } from "./settings.js";
import { Signer } from "./signing.js";

/** Largest record (a 1 MiB chunk plus key and headers) a consumer must accept per partition. */
export const MAX_RECORD_BYTES = 2 * 1024 * 1024;

/** Where one record landed. */
export interface Placement {
  partition: number;
  offset: number;
}

/** A kafkajs log line to stderr, warnings and errors only (kafkajs logs JSON-ish objects). */
function stderrLogger() {
  return ({ namespace, level, log }: LogEntry) => {
    if (level > KafkaLogLevel.WARN) return;
    const { message, ...extra } = log;
    const name = level === KafkaLogLevel.ERROR ? "ERROR" : "WARN";
    process.stderr.write(`kafkajs ${name} [${namespace}] ${message} ${JSON.stringify(extra)}\n`);
  };
}

/** One connection to the cluster: a producer, an admin client, and consumers made on demand. */
export class Bus {
  readonly topics: Topics;
  readonly signer: Signer | undefined;
  private readonly partitionCounts = new Map<string, number>();
  private readonly consumers = new Set<Consumer>();

  private constructor(
    readonly settings: Settings,
    readonly kafka: Kafka,
    private readonly producer: Producer,
    private readonly admin: Admin,
  ) {
    this.topics = topicsFor(settings.topicPrefix);
    this.signer = settings.keyFile !== undefined ? Signer.fromFile(settings.keyFile) : undefined;
  }

  /** Connect a producer and an admin client; `clientId` names the connections. */
  static async connect(settings: Settings, clientId: string): Promise<Bus> {
    if (settings.auth && settings.keyFile === undefined) {
      throw new ConfigError("ROUNDLOG_AUTH=signed: set ROUNDLOG_KEY_FILE");
    }
    const kafka = new Kafka({
      clientId: `roundlog-ts-${clientId}`,
      brokers: settings.bootstrap,
      logLevel: KafkaLogLevel.WARN,
      logCreator: stderrLogger,
      retry: { retries: 8, initialRetryTime: 200, maxRetryTime: 5000 },
    });
    const producer = kafka.producer({
      idempotent: false, // Tansu has no InitProducerId
      allowAutoTopicCreation: false,
      maxInFlightRequests: 1, // records of one partition stay in send order, even on retries
      // kafkajs asks the partitioner for every message; ours keeps the partition each record
      // states (a record without one is a bug here). Giving one also keeps kafkajs's warning
      // about its default partitioner change quiet.
      createPartitioner: () => ({ message }) => {
        if (typeof message.partition === "number") return message.partition;
        throw new Error("roundlog records carry an explicit partition");
      },
    });
    const admin = kafka.admin();
    await producer.connect();
    await admin.connect();
    const bus = new Bus(settings, kafka, producer, admin);
    return bus;
  }

  /** A topic's partition count, from cluster metadata (asked once per topic). */
  async partitionCount(topic: string): Promise<number> {
    const known = this.partitionCounts.get(topic);
    if (known !== undefined) return known;
    const { topics } = await this.admin.fetchTopicMetadata({ topics: [topic] });
    const count = topics.find((t) => t.name === topic)?.partitions.length ?? 0;
    if (count < 1) throw new Error(`topic ${topic} does not exist: run \`roundlog topics create\``);
    this.partitionCounts.set(topic, count);
    return count;
  }

  /** Each partition's end offset as ListOffsets(latest) reports it (Tansu may report it short, see client.ts). */
  async reportedEnds(topic: string): Promise<Map<number, number>> {
    const offsets = await this.admin.fetchTopicOffsets(topic);
    return new Map(offsets.map((o) => [o.partition, Number(o.high)]));
  }

  /** Send one record to the partition its key hashes to, acks=all; where it landed. */
  async send(topic: string, key: string, value: Buffer, headers?: IHeaders): Promise<Placement> {
    const partition = partitionFor(key, await this.partitionCount(topic));
    const [sent] = await this.producer.send({
      topic,
      acks: -1,
      messages: [{ key, value, partition, ...(headers ? { headers } : {}) }],
    });
    if (sent === undefined || sent.baseOffset === undefined || sent.errorCode !== 0) {
      throw new Error(`no acknowledgement for a record to ${topic}/${partition}: ${JSON.stringify(sent)}`);
    }
    if (sent.partition !== partition) throw new Error(`record for ${topic}/${partition} landed on ${sent.partition}`);
    return { partition, offset: Number(sent.baseOffset) };
  }

  /** The signature headers for an event value, or none when this client has no key. */
  seal(value: Buffer): IHeaders | undefined {
    if (this.signer !== undefined) return this.signer.headers(value);
    if (this.settings.auth) throw new ConfigError("ROUNDLOG_AUTH=signed: set ROUNDLOG_KEY_FILE");
    return undefined;
  }

  /**
   * Encode and sign an event and send it: heartbeats to the clients topic keyed by client id,
   * everything else to the events topic keyed by `key` (the session id).
   */
  async publish(eventType: string, event: object, key: string): Promise<Placement> {
    const value = encode(eventType, event);
    const topic = eventType === "ClientHeartbeat" ? this.topics.clients : this.topics.events;
    return this.send(topic, key, value, this.seal(value));
  }

  /**
   * A consumer that reads `positions` (partition → next offset) of `topic` and hands each
   * non-empty batch to `onBatch`, in order per partition; other partitions are paused. Resolves
   * once the group is joined and the partitions are positioned. `onBatch` must not throw.
   */
  async follow(
    topic: string,
    positions: Map<number, number>,
    onBatch: (batch: Batch) => void | Promise<void>,
    purpose: string,
  ): Promise<Follower> {
    const consumer = this.kafka.consumer({
      groupId: `roundlog-ts.${purpose}.${randomUUID()}`,
      // Tansu answers a new group's JoinGroup only after half the session timeout (kafkajs's
      // default 30 s: a 15 s wait); 6 s is the least Apache Kafka allows by default.
      sessionTimeout: this.settings.groupSessionTimeoutMs,
      heartbeatInterval: Math.max(100, Math.floor(this.settings.groupSessionTimeoutMs / 6)),
      rebalanceTimeout: Math.max(10_000, this.settings.groupSessionTimeoutMs),
      allowAutoTopicCreation: false,
      maxWaitTimeInMs: 250, // how long a fetch waits for new records: bounds the latency of news
      maxBytesPerPartition: 2 * MAX_RECORD_BYTES,
      maxBytes: 64 * 1024 * 1024,
      retry: { retries: 8, initialRetryTime: 200, maxRetryTime: 5000 },
    });
    const follower = new Follower(consumer, topic, positions);
    this.consumers.add(consumer);
    try {
      await follower.start(onBatch);
    } catch (error) {
      await this.release(follower);
      throw error;
    }
    return follower;
  }

  /** Stop and disconnect a follower's consumer (leaving its throwaway group). */
  async release(follower: Follower): Promise<void> {
    this.consumers.delete(follower.consumer);
    await follower.consumer.disconnect().catch(() => undefined);
  }

  async close(): Promise<void> {
    for (const consumer of this.consumers) await consumer.disconnect().catch(() => undefined);
    this.consumers.clear();
    await this.producer.disconnect().catch(() => undefined);
    await this.admin.disconnect().catch(() => undefined);
  }
}

/** A consumer following some partitions of one topic from known positions (see Bus.follow). */
export class Follower {
  /** The next offset to read of each followed partition; advanced as batches are handed over. */
  readonly positions: Map<number, number>;

  constructor(
    readonly consumer: Consumer,
    readonly topic: string,
    positions: Map<number, number>,
  ) {
    this.positions = new Map(positions);
  }

  async start(onBatch: (batch: Batch) => void | Promise<void>): Promise<void> {
    const { consumer, topic } = this;
    let joined!: () => void;
    let failed!: (error: Error) => void;
    const ready = new Promise<void>((resolve, reject) => {
      joined = resolve;
      failed = reject;
    });
    // Emitted after JoinGroup+SyncGroup and before the first fetch of each generation: a seek
    // made here is applied to that fetch (kafkajs drops any batch fetched while a seek is pending).
    consumer.on(consumer.events.GROUP_JOIN, ({ payload }) => {
      const assigned = payload.memberAssignment[topic] ?? [];
      const idle = assigned.filter((p) => !this.positions.has(p));
      if (idle.length > 0) consumer.pause([{ topic, partitions: idle }]);
      for (const [partition, offset] of this.positions) {
        consumer.seek({ topic, partition, offset: String(offset) });
      }
      const missing = [...this.positions.keys()].filter((p) => !assigned.includes(p));
      if (missing.length > 0) {
        failed(new Error(`${topic} has no partition(s) ${missing.join(", ")} assigned`));
      } else {
        joined();
      }
    });
    consumer.on(consumer.events.CRASH, ({ payload }) => {
      if (!payload.restart) failed(payload.error);
    });
    await consumer.connect();
    await consumer.subscribe({ topics: [topic], fromBeginning: false });
    await consumer.run({
      autoCommit: false, // positions live in this process only
      eachBatchAutoResolve: true,
      eachBatch: async ({ batch }) => {
        if (!this.positions.has(batch.partition) || batch.messages.length === 0) return;
        const last = batch.messages[batch.messages.length - 1] as KafkaMessage;
        await onBatch(batch);
        if (this.positions.has(batch.partition)) this.positions.set(batch.partition, Number(last.offset) + 1);
      },
    });
    await ready;
  }

  /** Start (or restart) reading `partition` from `offset`; its next batches go to the handler. */
  readFrom(partition: number, offset: number): void {
    this.positions.set(partition, offset);
    this.consumer.seek({ topic: this.topic, partition, offset: String(offset) });
    this.consumer.resume([{ topic: this.topic, partitions: [partition] }]);
  }

  /** Stop reading `partition` (it is paused until the next readFrom). */
  stopReading(partition: number): void {
    this.positions.delete(partition);
    this.consumer.pause([{ topic: this.topic, partitions: [partition] }]);
  }
}
