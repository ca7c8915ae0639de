// GET /mesh/checkpoints/{model}/{key} in process, its gate faked: the model id as a fetcher encodes it, and callers
// the gate did not verify.
import { describe, expect, test } from "bun:test";
import { meshCheckpointRoutes } from "../../src/server/mesh-checkpoints";
import type { MeshGate } from "../../src/server/mesh-gate";
import type { ServedModel } from "../../src/server/model";

const blob = Uint8Array.from([1, 2, 3, 4]);

function app(id: string, verified = true) {
  const asked: string[] = [];
  const gate = { caller: () => (verified ? { nodeId: "peer" } : undefined) } as unknown as MeshGate;
  const model = {
    id,
    engine: {
      exportCheckpoint: async (key: string) => {
        asked.push(key);
        return key === "k1" ? blob : null;
      },
    },
  } as unknown as ServedModel;
  return { routes: meshCheckpointRoutes({ gate, models: [model] }), asked };
}

const get = (routes: ReturnType<typeof app>["routes"], model: string, key: string) =>
  routes.handle(new Request(`http://localhost/mesh/checkpoints/${encodeURIComponent(model)}/${key}`));

describe("mesh checkpoint route", () => {
  test("a_model_id_with_a_percent_sign_is_found_as_the_fetcher_encodes_it", async () => {
    // The fetcher encodes the id once and the router decodes it once: a second decode threw (500) or changed the id.
    for (const id of ["model 100%", "a%20b", "qwen2.5-7b"]) {
      const { routes } = app(id);
      const r = await get(routes, id, "k1");
      expect({ id, status: r.status }).toEqual({ id, status: 200 });
      expect(new Uint8Array(await r.arrayBuffer())).toEqual(blob);
    }
  });

  test("a_caller_the_gate_did_not_verify_gets_401_and_nothing_is_looked_up", async () => {
    const { routes, asked } = app("m", false);
    const r = await get(routes, "m", "k1");
    expect(r.status).toBe(401);
    expect(asked).toEqual([]);
  });
});
