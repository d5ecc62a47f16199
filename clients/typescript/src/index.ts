/** roundlog-client: take part in roundlog's federated rounds from Node.js. */
export * from "./bus.js";
export * from "./client.js";
export * from "./codec.js";
export * as deterministic from "./deterministic.js";
export * from "./events.js";
export * from "./ids.js";
export * from "./partitioning.js";
export * from "./settings.js";
export * from "./signing.js";
export * from "./tensors.js";
