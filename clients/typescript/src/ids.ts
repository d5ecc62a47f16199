/**
 * Deterministic ids: UUIDv5 (RFC 4122) in the namespace uuid5(NAMESPACE_URL, "roundlog.v1") of
 * the parts joined by "/". A retried answer thus carries the same ids as the first one.
 */

import { v4 as uuid4, v5 as uuid5 } from "uuid";
import type { Task } from "./events.js";

/** RFC 4122's URL namespace. */
const NAMESPACE_URL = "6ba7b811-9dad-11d1-80b4-00c04fd430c8";
/** roundlog's id namespace: uuid5(NAMESPACE_URL, "roundlog.v1"). */
export const ID_NAMESPACE = uuid5("roundlog.v1", NAMESPACE_URL);

/** The id derived from `parts`, as Python's roundlog.domain.events.derived_id. */
export function derivedId(...parts: string[]): string {
  return uuid5(parts.join("/"), ID_NAMESPACE);
}

/** A client's update id in a round, also the tensors key of its chunks. */
export function updateIdFor(roundId: string, clientId: string): string {
  return derivedId(roundId, "client", clientId, "update");
}

/** The event id of a client's answer to a round of `task`. */
export function answerEventId(roundId: string, clientId: string, task: Task): string {
  return derivedId(roundId, "client", clientId, task);
}

/** A random (v4) id, for heartbeats. */
export function randomId(): string {
  return uuid4();
}
