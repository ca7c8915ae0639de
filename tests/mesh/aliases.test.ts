// Aliases across two `mesh serve` processes: A serves alpha as gpt-4o too; B (serving beta) learns
// the alias from A's worker record, routes requests for it to A, and shows it in `mesh peers`.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import type { PeersReport } from "../../src/server/mesh-routes";
import { clusterDir, meshCli, type NodeProc, peersOf, spawnNode, tokenOf, waitFor } from "../helpers/cluster";

const dir = clusterDir();
let a: NodeProc;
let b: NodeProc;

beforeAll(async () => {
  a = await spawnNode({ name: "a", dir, model: "alpha", args: ["--alias", "gpt-4o"] });
  b = await spawnNode({ name: "b", dir, model: "beta", args: ["--join", tokenOf(a)] });
  await waitFor("B to see A's worker with its alias", 60_000, async () => {
    const r: PeersReport | null = await peersOf(b);
    return r?.members.some((m) => m.name === "a" && m.state === "alive" && m.aliases?.alpha?.includes("gpt-4o")) ?? false;
  });
}, 300_000);

afterAll(async () => {
  for (const n of [a, b]) n?.proc.kill("SIGKILL");
  await Promise.all([a, b].map((n) => n?.proc.exited));
});

describe("aliases in a mesh of two processes", () => {
  test("a_request_for_an_alias_at_another_node_is_forwarded_to_the_node_that_carries_it", async () => {
    const client = new OpenAI({ baseURL: `${b.url}/v1`, apiKey: "unused", maxRetries: 0, timeout: 120_000 });
    const r = await client.chat.completions
      .create({ model: "gpt-4o", messages: [{ role: "user", content: "hi" }], max_tokens: 3 })
      .withResponse();
    expect(r.data.model).toBe("gpt-4o");
    expect(r.data.usage?.completion_tokens).toBeGreaterThan(0);
    const peers = await peersOf(b);
    const aId = peers?.members.find((m) => m.name === "a")?.id;
    expect(r.response.headers.get("x-mesh-served-by")).toBe(aId as string);
    const ids: string[] = [];
    for await (const m of client.models.list()) ids.push(m.id);
    expect(ids.sort()).toEqual(["alpha", "beta", "gpt-4o"]);
    // The tokenizer endpoints follow the alias too.
    const t = await fetch(`${b.url}/tokenize`, { method: "POST", body: JSON.stringify({ model: "gpt-4o", content: "hi" }) });
    expect(t.status).toBe(200);
  }, 120_000);

  test("mesh_peers_shows_the_alias_beside_its_model", () => {
    const r = meshCli(["peers", "--state-dir", b.stateDir]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("alpha (gpt-4o)");
  });
});
