#!/usr/bin/env node
/**
 * The deterministic roundlog trainer (see deterministic.ts), as a command:
 *
 *   node dist/trainer.js --client-id ts-0 --offset 0.5 --num-examples 80
 *
 * Options may also come from ROUNDLOG_CLIENT_ID, ROUNDLOG_TRAINER_OFFSET and
 * ROUNDLOG_TRAINER_NUM_EXAMPLES; Kafka settings from the ROUNDLOG_* variables (settings.ts).
 * Runs until SIGTERM or SIGINT, then finishes the answers it started and exits.
 */

import { parseArgs } from "node:util";
import { FederatedClient } from "./client.js";
import { predict, train, validate } from "./deterministic.js";
import { ConfigError, settingsFromEnv } from "./settings.js";

const USAGE = "usage: trainer --client-id ID [--offset X] [--num-examples N]";

function options(argv: string[]): { clientId: string; offset: number; numExamples: number } {
  const { values } = parseArgs({
    args: argv,
    options: {
      "client-id": { type: "string" },
      offset: { type: "string" },
      "num-examples": { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
  }
  const clientId = values["client-id"] ?? process.env.ROUNDLOG_CLIENT_ID;
  const offset = Number(values.offset ?? process.env.ROUNDLOG_TRAINER_OFFSET ?? "0.25");
  const numExamples = Number(values["num-examples"] ?? process.env.ROUNDLOG_TRAINER_NUM_EXAMPLES ?? "100");
  if (!clientId) throw new ConfigError(`--client-id is required (${USAGE})`);
  if (!Number.isFinite(offset)) throw new ConfigError(`--offset must be a number`);
  if (!Number.isInteger(numExamples) || numExamples < 0) throw new ConfigError(`--num-examples must be a count`);
  return { clientId, offset, numExamples };
}

async function main(): Promise<void> {
  const { clientId, offset, numExamples } = options(process.argv.slice(2));
  const settings = settingsFromEnv();
  const client = new FederatedClient(settings, {
    clientId,
    train: (arrays) => train(arrays, offset, numExamples),
    validate: (arrays) => validate(arrays, numExamples),
    predict: (arrays) => predict(arrays),
  });
  const stop = new AbortController();
  for (const signal of ["SIGTERM", "SIGINT"] as const) {
    process.once(signal, () => {
      process.stderr.write(`${clientId}: ${signal}, stopping\n`);
      stop.abort();
    });
  }
  await client.run(stop.signal);
}

main().then(
  () => process.exit(0),
  (error: unknown) => {
    const text = error instanceof ConfigError ? error.message : ((error as Error).stack ?? String(error));
    process.stderr.write(`trainer: ${text}\n`);
    process.exit(error instanceof ConfigError ? 2 : 1);
  },
);
