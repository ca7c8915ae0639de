// A session across two `mesh serve` processes serving the same model. It lives on the node that
// served its first turn; its checkpoints keep that node's claim on the conversation's prefix in the
// routing index after its slots were taken by other work (host-RAM tier off), so a later turn sent to
// the other node is forwarded to it; and when that node is gone, the other serves it by full prefill.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { clusterDir, modelsOf, type NodeProc, peersOf, spawnNode, tokenOf, waitFor } from "../helpers/cluster";

const dir = clusterDir();
const nodes: NodeProc[] = [];
let a: NodeProc;
let b: NodeProc;
// No host-RAM tier: once a slot is taken, only a checkpoint still holds the conversation.
const ARGS = ["--cache-ram", "0"];

beforeAll(async () => {
  a = await spawnNode({ name: "a", dir, model: "shared", args: ARGS });
  nodes.push(a);
  b = await spawnNode({ name: "b", dir, model: "shared", args: [...ARGS, "--join", tokenOf(a)] });
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

// Long enough (about 700 tokens) that serving it where it is cached clearly beats a cold prefill: a short prompt makes the two near-equal and the policy picks at random.
const SYSTEM = "You are a build agent. Follow the plan and report each step. ".repeat(55);
type Msg = { role: string; content: string | null };

async function turn(n: NodeProc, session: string, messages: Msg[], maxTokens = 4) {
  const r = await fetch(`${n.url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-session-id": session },
    body: JSON.stringify({ model: "shared", messages, max_tokens: maxTokens, temperature: 0 }),
  });
  expect(r.status).toBe(200);
  const body = (await r.json()) as { choices: Array<{ message: { content: string | null } }> };
  return { route: r.headers.get("x-mesh-route"), reply: { role: "assistant", content: body.choices[0]?.message.content ?? null } };
}

const sessionOn = async (n: NodeProc, id: string) => {
  const r = await fetch(`${n.url}/v1/sessions/${id}`);
  return r.status === 200 ? ((await r.json()) as { turns: number }) : null;
};

/** Sessions whose first turn `n` served (first turns go where the policy says; later ones stay with their holder). */
async function sessionsHeldBy(n: NodeProc, want: number): Promise<string[]> {
  const held: string[] = [];
  for (let i = 0; held.length < want && i < 40; i++) {
    const id = `filler-${n.name}-${i}`;
    await turn(n, id, [{ role: "user", content: `filler ${i}` }], 1);
    if (await sessionOn(n, id)) held.push(id);
  }
  expect(held.length).toBe(want);
  return held;
}

/** Take both of `n`'s slots with long unrelated prompts (sessions it holds, so they run there). */
async function takeSlots(n: NodeProc, fillers: string[], round: number) {
  await Promise.all(
    fillers.map((id, k) =>
      turn(
        n,
        id,
        [
          { role: "user", content: `filler ${k}` },
          { role: "assistant", content: null },
          { role: "user", content: `unrelated work ${round} ${k} `.repeat(60) },
        ],
        24,
      ),
    ),
  );
}

describe("sessions in a mesh", () => {
  // A node that does not serve the model forwards every turn; the session must open on the node that ran the
  // turn, whichever API it came in on (the session rides in the forwarded path's query), and never on the forwarder.
  test("a_turn_forwarded_to_a_peer_opens_its_session_there_on_the_messages_and_responses_apis", async () => {
    const c = await spawnNode({ name: "c", dir, model: "elsewhere", args: [...ARGS, "--join", tokenOf(a)] });
    nodes.push(c);
    await waitFor(
      "the forwarder to list both workers of the shared model",
      60_000,
      async () => (await modelsOf(c)).get("shared")?.length === 2,
    );
    const post = (path: string, id: string, body: object) =>
      fetch(`${c.url}${path}`, {
        method: "POST",
        headers: { "content-type": "application/json", "x-session-id": id },
        body: JSON.stringify(body),
      });
    const sent = [
      [
        "messages-1",
        () => post("/v1/messages", "messages-1", { model: "shared", max_tokens: 1, messages: [{ role: "user", content: "hi" }] }),
      ],
      ["responses-1", () => post("/v1/responses", "responses-1", { model: "shared", max_output_tokens: 1, input: "hi" })],
    ] as const;
    for (const [id, send] of sent) {
      const r = await send();
      expect({ id, status: r.status }).toEqual({ id, status: 200 });
      expect(r.headers.get("x-session-id")).toBe(id);
      // Run by a peer, not by the forwarder.
      expect(r.headers.get("x-mesh-route")).not.toBe("local");
      await r.body?.cancel();
      const [onA, onB, onC] = await Promise.all([sessionOn(a, id), sessionOn(b, id), sessionOn(c, id)]);
      expect(onC).toBeNull();
      expect({ id, held: (onA ? 1 : 0) + (onB ? 1 : 0), turns: (onA ?? onB)?.turns }).toEqual({ id, held: 1, turns: 1 });
    }
  }, 240_000);

  test("a_session_follows_its_checkpoints_to_the_holder_and_another_node_serves_it_when_the_holder_is_gone", async () => {
    let h: Msg[] = [
      { role: "system", content: SYSTEM },
      { role: "user", content: "step 1" },
    ];
    const t1 = await turn(a, "agent-1", h);
    const [onA, onB] = await Promise.all([sessionOn(a, "agent-1"), sessionOn(b, "agent-1")]);
    expect((onA ? 1 : 0) + (onB ? 1 : 0)).toBe(1);
    const holder = onA ? a : b;
    const other = onA ? b : a;
    // Sent to the holder, a later turn runs there whatever the policy says.
    h = [...h, t1.reply, { role: "user", content: "step 2" }];
    const t2 = await turn(holder, "agent-1", h);
    expect(t2.route).toBe("local");
    let reply = t2.reply;

    // Twice: other work takes the holder's slots, then a turn sent to the other node reaches the holder.
    const fillers = await sessionsHeldBy(holder, 2);
    const syncOf = async (n: NodeProc) => (await peersOf(n))?.routing?.sync ?? null;
    for (let round = 3; round <= 4; round++) {
      await takeSlots(holder, fillers, round);
      h = [...h, reply, { role: "user", content: `step ${round}` }];
      // What the holder's KV and checkpoints hold reaches the other node's index as routing deltas, one batch
      // a round: wait for a batch sent after the slots were taken to be acknowledged.
      const acked = (await syncOf(holder))?.batchesAcked ?? 0;
      await waitFor("the holder's routing deltas to reach the other node", 60_000, async () => {
        const [hs, os] = await Promise.all([syncOf(holder), syncOf(other)]);
        return hs !== null && os !== null && hs.batchesAcked > acked && os.insertsApplied > 0;
      });
      // The routing policy weighs the holder's load as the other node last heard it: wait until that says idle.
      await waitFor("the other node to see the holder idle", 60_000, async () => {
        const row = (await peersOf(other))?.members.find((m) => m.name === holder.name);
        return row !== undefined && row.slots_busy === 0 && row.queue_depth === 0 && row.kv_used === 0;
      });
      reply = (await turn(other, "agent-1", h)).reply;
      expect((await sessionOn(holder, "agent-1"))?.turns).toBe(round);
      expect(await sessionOn(other, "agent-1")).toBeNull();
    }

    // The holder dies: the other node serves the next turn (full prefill) and the session goes on there.
    holder.proc.kill("SIGKILL");
    await holder.proc.exited;
    h = [...h, reply, { role: "user", content: "step 5" }];
    await turn(other, "agent-1", h);
    expect((await sessionOn(other, "agent-1"))?.turns).toBe(1);
  }, 240_000);
});
