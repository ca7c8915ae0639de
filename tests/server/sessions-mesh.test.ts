// A session across two `mesh serve` processes serving the same model: it lives on the node
// that served its first turn, its later turns run there (next to its checkpoints) whatever the
// routing policy would pick, and when that node is gone the other serves it by full prefill.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { clusterDir, modelsOf, type NodeProc, spawnNode, tokenOf, waitFor } from "../helpers/cluster";

const dir = clusterDir();
const nodes: NodeProc[] = [];
let a: NodeProc;
let b: NodeProc;

beforeAll(async () => {
  a = await spawnNode({ name: "a", dir, model: "shared" });
  nodes.push(a);
  b = await spawnNode({ name: "b", dir, model: "shared", args: ["--join", tokenOf(a)] });
  nodes.push(b);
  await waitFor("both nodes to list both workers", 60_000, async () => {
    const all = await Promise.all([a, b].map(async (n) => (await modelsOf(n)).get("shared")?.length === 2));
    return all.every(Boolean);
  });
}, 240_000);

afterAll(async () => {
  for (const n of nodes) n.proc.kill("SIGKILL");
  await Promise.all(nodes.map((n) => n.proc.exited));
});

const SYSTEM = "You are a build agent. Follow the plan and report each step. ".repeat(10);

async function turn(n: NodeProc, messages: unknown[]) {
  const r = await fetch(`${n.url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-session-id": "agent-1" },
    body: JSON.stringify({ model: "shared", messages, max_tokens: 4, temperature: 0 }),
  });
  expect(r.status).toBe(200);
  const body = (await r.json()) as { choices: Array<{ message: { content: string | null } }>; usage: { prompt_tokens: number } };
  return { route: r.headers.get("x-mesh-route"), reply: { role: "assistant", content: body.choices[0]?.message.content ?? null } };
}

const sessionOn = async (n: NodeProc) => {
  const r = await fetch(`${n.url}/v1/sessions/agent-1`);
  return r.status === 200 ? ((await r.json()) as { turns: number }) : null;
};

describe("sessions in a mesh", () => {
  test("a_session_stays_on_the_node_holding_it_and_another_serves_it_when_that_node_is_gone", async () => {
    const h1 = [
      { role: "system", content: SYSTEM },
      { role: "user", content: "step 1" },
    ];
    const t1 = await turn(a, h1);
    // Whichever node the policy chose for the first turn holds the session (the header travels with a forwarded request).
    const [onA, onB] = await Promise.all([sessionOn(a), sessionOn(b)]);
    expect((onA ? 1 : 0) + (onB ? 1 : 0)).toBe(1);
    const holder = onA ? a : b;
    const other = onA ? b : a;
    // Later turns sent to the holder run there, next to the checkpoints.
    const h2 = [...h1, t1.reply, { role: "user", content: "step 2" }];
    const t2 = await turn(holder, h2);
    expect(t2.route).toBe("local");
    expect((await sessionOn(holder))?.turns).toBe(2);

    // The holder dies: the other node serves the next turn (full prefill) and the session goes on there.
    holder.proc.kill("SIGKILL");
    await holder.proc.exited;
    const h3 = [...h2, t2.reply, { role: "user", content: "step 3" }];
    await turn(other, h3);
    const moved = await sessionOn(other);
    expect(moved?.turns).toBeGreaterThanOrEqual(1);
  }, 240_000);
});
