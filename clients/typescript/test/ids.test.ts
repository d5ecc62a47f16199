import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { ID_NAMESPACE, answerEventId, derivedId, updateIdFor } from "../src/ids.js";
import type { Task } from "../src/events.js";
import { vectors } from "./vectors.js";

const data = vectors("ids.json") as {
  namespace: string;
  derived: { parts: string[]; id: string }[];
  answers: { round_id: string; client_id: string; update_id: string; event_ids: Record<Task, string> }[];
};

describe("ids against ids.json", () => {
  it("namespace", () => assert.equal(ID_NAMESPACE, data.namespace));
  for (const d of data.derived) {
    it(`derived ${JSON.stringify(d.parts)}`, () => assert.equal(derivedId(...d.parts), d.id));
  }
  for (const a of data.answers) {
    it(`answers of ${a.client_id}`, () => {
      assert.equal(updateIdFor(a.round_id, a.client_id), a.update_id);
      for (const [task, id] of Object.entries(a.event_ids)) {
        assert.equal(answerEventId(a.round_id, a.client_id, task as Task), id);
      }
    });
  }
});
