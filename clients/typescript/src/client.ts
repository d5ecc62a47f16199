/**
 * A federated client (mirrors roundlog.client.FederatedClient): it heartbeats its roles, waits
 * for a ClientsAssigned that names it, fetches the round's model from the tensors topic, runs
 * your function and submits the answer as an event with deterministic ids.
 *
 * Startup order matters: every partition of the events topic is positioned at its true end
 * BEFORE the first heartbeat, so no assignment made after the coordinator first sees this client
 * can be missed. Tansu answers ListOffsets(latest) with the base offset of the partition's last
 * record batch plus one, short of the end when that batch holds several records; so each
 * non-empty partition is read from one record before the reported end, and its first fetch's
 * high watermark (the true end) marks where news begins. Older records are skipped.
 */

import { once } from "node:events";
import type { Batch, KafkaMessage } from "kafkajs";
import { Bus, type Follower } from "./bus.js";
import { decode } from "./codec.js";
import type {
  ClientHeartbeat,
  ClientRole,
  ClientsAssigned,
  PredictionReceived,
  RoundConfig,
  Task,
  UpdateReceived,
  ValidationReceived,
} from "./events.js";
import { answerEventId, randomId, updateIdFor } from "./ids.js";
import type { Settings } from "./settings.js";
import { signatureProblem } from "./signing.js";
import { TensorReader, writeTensors, type NamedArray } from "./tensors.js";

export interface TrainResult {
  /** The updated model: the same names, dtypes and shapes as the one given. */
  arrays: NamedArray[];
  numExamples: number;
  metrics: Record<string, number>;
}
export interface ValidateResult {
  numExamples: number;
  metrics: Record<string, number>;
}
export interface PredictResult {
  summary: string;
  metrics: Record<string, number>;
}

type MaybePromise<T> = T | Promise<T>;
export type TrainFn = (arrays: NamedArray[], config: RoundConfig) => MaybePromise<TrainResult>;
export type ValidateFn = (arrays: NamedArray[], config: RoundConfig) => MaybePromise<ValidateResult>;
export type PredictFn = (arrays: NamedArray[], config: RoundConfig) => MaybePromise<PredictResult>;

export interface ClientOptions {
  clientId: string;
  train?: TrainFn;
  validate?: ValidateFn;
  predict?: PredictFn;
  /** Heartbeat period (default 2000 ms; the coordinator counts a client live 10 s after its last one). */
  heartbeatEveryMs?: number;
  /** Heartbeat labels (default {language: "typescript"}). */
  labels?: Record<string, string>;
  /** Where log lines go (default: stderr). */
  log?: (line: string) => void;
}

/** How long startup waits for the first fetch of each events partition before trusting ListOffsets. */
const END_PROBE_MS = 10_000;

export class FederatedClient {
  readonly clientId: string;
  private readonly heartbeatEveryMs: number;
  private readonly labels: Record<string, string>;
  private readonly log: (line: string) => void;
  private readonly answered = new Set<string>();
  private readonly inflight = new Set<Promise<void>>();
  private reader: Promise<TensorReader> | undefined;

  constructor(
    readonly settings: Settings,
    private readonly options: ClientOptions,
  ) {
    if (!options.train && !options.validate && !options.predict) {
      throw new Error("a client needs at least one of train, validate and predict");
    }
    this.clientId = options.clientId;
    this.heartbeatEveryMs = options.heartbeatEveryMs ?? 2000;
    this.labels = options.labels ?? { language: "typescript" };
    this.log = options.log ?? ((line) => process.stderr.write(`${line}\n`));
  }

  get roles(): ClientRole[] {
    const roles: ClientRole[] = this.options.train ? ["trainer"] : [];
    if (this.options.validate || this.options.predict) roles.push("validator");
    return roles;
  }

  /** Heartbeat and answer assignments until `signal` aborts; answers already started are finished. */
  async run(signal: AbortSignal): Promise<void> {
    const bus = await Bus.connect(this.settings, this.clientId);
    let follower: Follower | undefined;
    let beats: NodeJS.Timeout | undefined;
    let fatal!: (error: unknown) => void;
    const failed = new Promise<never>((_, reject) => (fatal = reject));
    failed.catch(() => undefined); // raced below; a failure during startup surfaces there too
    const stopped = signal.aborted ? Promise.resolve() : once(signal, "abort");
    // Both consumers join their groups at the same time (each join takes seconds on Tansu).
    const opening = TensorReader.open(bus);
    opening.catch(() => undefined); // awaited below; answers wait for it too
    this.reader = opening;
    try {
      follower = await this.followEvents(bus, fatal);
      await opening;
      if (signal.aborted) return;
      const beat = () =>
        this.heartbeat(bus).catch((error: unknown) => fatal(new Error(`heartbeat failed: ${String(error)}`)));
      await beat();
      beats = setInterval(beat, this.heartbeatEveryMs);
      this.log(`${this.clientId}: following ${bus.topics.events}, heartbeating as ${this.roles.join(", ")}`);
      await Promise.race([stopped, failed]);
    } finally {
      clearInterval(beats);
      if (follower) await bus.release(follower); // no new assignments; those started are finished
      await Promise.allSettled([...this.inflight]);
      await opening.then((reader) => reader.close()).catch(() => undefined);
      await bus.close();
    }
  }

  /** A follower of every events partition from its true end; resolves once all ends are known. */
  private async followEvents(bus: Bus, fatal: (error: unknown) => void): Promise<Follower> {
    const topic = bus.topics.events;
    const partitions = await bus.partitionCount(topic);
    const reported = await bus.reportedEnds(topic);
    const start = new Map<number, number>(); // partition → first offset that is news
    const probeFrom = new Map<number, number>();
    for (let p = 0; p < partitions; p++) {
      const end = reported.get(p) ?? 0;
      if (end > 0) {
        probeFrom.set(p, end - 1); // the record before the reported end: its fetch tells the true end
      } else {
        probeFrom.set(p, 0); // empty: everything in it will be news
        start.set(p, 0);
      }
    }
    let allKnown!: () => void;
    const known = new Promise<void>((resolve) => (allKnown = resolve));
    const checkKnown = () => start.size === partitions && allKnown();
    checkKnown();
    const onBatch = (batch: Batch) => {
      if (!start.has(batch.partition)) {
        const end = Math.max(reported.get(batch.partition) ?? 0, Number(batch.highWatermark));
        start.set(batch.partition, end);
        checkKnown();
      }
      const from = start.get(batch.partition)!;
      for (const message of batch.messages) {
        if (Number(message.offset) >= from) this.consider(bus, message);
      }
    };
    const follower = await bus.follow(topic, probeFrom, onBatch, "events");
    follower.consumer.on(follower.consumer.events.CRASH, ({ payload }) => {
      if (!payload.restart) fatal(payload.error);
    });
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((resolve) => (timer = setTimeout(resolve, END_PROBE_MS)));
    await Promise.race([known, timeout]);
    clearTimeout(timer);
    for (let p = 0; p < partitions; p++) {
      if (!start.has(p)) {
        this.log(`${this.clientId}: no record read from ${topic}/${p}; taking its reported end ${reported.get(p)}`);
        start.set(p, reported.get(p) ?? 0);
      }
    }
    return follower;
  }

  private async heartbeat(bus: Bus): Promise<void> {
    const beat: ClientHeartbeat = {
      event_id: randomId(),
      occurred_at: Date.now(),
      client_id: this.clientId,
      roles: this.roles,
      labels: this.labels,
    };
    await bus.publish("ClientHeartbeat", beat, this.clientId);
  }

  /** Answer `message` if it is a new, genuine assignment of this client. */
  private consider(bus: Bus, message: KafkaMessage): void {
    if (message.value === null) return;
    let job: ClientsAssigned;
    try {
      const decoded = decode(message.value);
      if (decoded?.type !== "ClientsAssigned") return;
      job = decoded.value as ClientsAssigned;
    } catch {
      return; // not an event we can read: the fold dead-letters it, we ignore it
    }
    if (!job.client_ids.includes(this.clientId) || this.answered.has(job.event_id)) return;
    if (this.settings.auth) {
      const problem = signatureProblem(message.headers, message.value);
      if (problem !== undefined) {
        this.log(`${this.clientId}: ignoring an assignment of round ${job.round_id}: ${problem}`);
        return;
      }
    }
    this.answered.add(job.event_id);
    const work = this.answer(bus, job);
    this.inflight.add(work);
    void work.finally(() => this.inflight.delete(work));
  }

  /** Fetch the round's model, run the function for its task and publish the answer; never throws. */
  private async answer(bus: Bus, job: ClientsAssigned): Promise<void> {
    try {
      const functions: Record<Task, unknown> = {
        training: this.options.train,
        validation: this.options.validate,
        inference: this.options.predict,
      };
      if (functions[job.task] === undefined) {
        this.log(`${this.clientId}: no function for ${job.task} round ${job.round_id}`);
        return;
      }
      const reader = await this.reader;
      if (reader === undefined) throw new Error("no tensor reader");
      const model = await reader.read(job.model);
      const [eventType, event] = await this.result(bus, job, model);
      await bus.publish(eventType, event, job.session_id);
      this.log(`answered ${job.task} round ${job.round_id}`);
    } catch (error) {
      this.log(`${this.clientId}: ${job.task} round ${job.round_id} failed: ${(error as Error).stack ?? String(error)}`);
    }
  }

  /** The answer to `job`, stating the sha256 of the model it was computed on. */
  private async result(bus: Bus, job: ClientsAssigned, model: NamedArray[]): Promise<[string, object]> {
    const ids = {
      event_id: answerEventId(job.round_id, this.clientId, job.task),
      session_id: job.session_id,
      round_id: job.round_id,
      client_id: this.clientId,
    };
    if (job.task === "training") {
      const out = await this.options.train!(model, job.config);
      const updateId = updateIdFor(job.round_id, this.clientId);
      const tensor = await writeTensors(bus, updateId, out.arrays);
      const event: UpdateReceived = {
        ...ids,
        occurred_at: Date.now(),
        update_id: updateId,
        num_examples: Math.trunc(out.numExamples),
        metrics: floats(out.metrics),
        tensor,
        base_model_sha256: job.model.sha256,
      };
      return ["UpdateReceived", event];
    }
    if (job.task === "validation") {
      const out = await this.options.validate!(model, job.config);
      const event: ValidationReceived = {
        ...ids,
        occurred_at: Date.now(),
        model_id: job.model_id,
        num_examples: Math.trunc(out.numExamples),
        metrics: floats(out.metrics),
        model_sha256: job.model.sha256,
      };
      return ["ValidationReceived", event];
    }
    const out = await this.options.predict!(model, job.config);
    const event: PredictionReceived = {
      ...ids,
      occurred_at: Date.now(),
      model_id: job.model_id,
      summary: out.summary,
      metrics: floats(out.metrics),
      model_sha256: job.model.sha256,
    };
    return ["PredictionReceived", event];
  }
}

function floats(metrics: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.entries(metrics).map(([k, v]) => [k, Number(v)]));
}
