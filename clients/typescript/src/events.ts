/**
 * The shapes of the events a client reads and writes, as the current schemas define them
 * (schemas/<Event>.avsc). Timestamps are Avro timestamp-millis: numbers of milliseconds since the
 * epoch, UTC. Longs are JavaScript numbers (exact up to 2^53, far beyond any offset or count here).
 */

export type Task = "training" | "validation" | "inference";
export type ClientRole = "trainer" | "validator";

export interface ArraySpec {
  name: string;
  /** numpy's little-endian type string ("<f4", "<f8", "<i8", "|u1", "|b1", ...). */
  dtype: string;
  shape: number[];
}

/** Where a blob (a model or an update) lies on the tensors topic. */
export interface TensorRef {
  key: string;
  partition: number;
  first_offset: number;
  last_offset: number;
  chunks: number;
  nbytes: number;
  /** Hex sha256 of the whole raw byte stream. */
  sha256: string;
  arrays: ArraySpec[];
}

export interface RoundConfig {
  round_timeout: number;
  buffer_size: number;
  clients_required: number;
  max_clients: number;
  min_updates: number;
  aggregator: string;
  aggregator_kwargs: string;
  max_num_examples: number;
  max_weight_share: number;
}

export interface ClientHeartbeat {
  event_id: string;
  occurred_at: number;
  client_id: string;
  roles: ClientRole[];
  labels: Record<string, string>;
}

export interface ClientsAssigned {
  event_id: string;
  occurred_at: number;
  session_id: string;
  round_id: string;
  client_ids: string[];
  deadline: number;
  task: Task;
  model_id: string;
  model: TensorRef;
  config: RoundConfig;
}

interface Answer {
  event_id: string;
  occurred_at: number;
  session_id: string;
  round_id: string;
  client_id: string;
  metrics: Record<string, number>;
}

export interface UpdateReceived extends Answer {
  update_id: string;
  num_examples: number;
  tensor: TensorRef;
  base_model_sha256: string;
}

export interface ValidationReceived extends Answer {
  model_id: string;
  num_examples: number;
  model_sha256: string;
}

export interface PredictionReceived extends Answer {
  model_id: string;
  summary: string;
  model_sha256: string;
}
