// Five `mesh serve` processes whose peer traffic passes through a fault proxy
// (tests/helpers/fault-proxy.ts): a clean 3 + 2 partition and its healing, an
// asymmetric link, a flapping node, and lossy, slow links. The tests run in
// order on the mesh the earlier ones leave.
//
// Bounds, from the membership defaults (1 s rounds, 5 suspicion rounds,
// a dead member retried every 10 rounds, tables compared every 5):
// - detection: failureDetectionBoundMs(5) = 14 s, plus slack for this shared
//   2-core machine;
// - convergence after healing: a dead member is retried within 10 rounds by
//   each node, the retry refutes the death (the returning node resets), news
//   spreads within log2(n) + 1 rounds, and tables settle at the next
//   push-pull (5 rounds): about 20 s; asserted with the same slack.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import { failureDetectionBoundMs, MEMBERSHIP_DEFAULTS } from "../../src/mesh/membership";
import { type NodeProc, peersOf, waitFor } from "../helpers/cluster";
import { deathsOf, type FaultMesh, startFaultMesh, viewKey, viewsOf } from "../helpers/fault-mesh";

const SLACK_MS = 20_000;
const DETECT_MS = failureDetectionBoundMs(5) + SLACK_MS;
const HEAL_MS =
  MEMBERSHIP_DEFAULTS.roundMs * (MEMBERSHIP_DEFAULTS.reconnectEveryRounds + 2 * MEMBERSHIP_DEFAULTS.syncEveryRounds) + SLACK_MS;
const SUSPICION_MS = MEMBERSHIP_DEFAULTS.suspicionRounds * MEMBERSHIP_DEFAULTS.roundMs;

let mesh: FaultMesh;
let n1: NodeProc;
let n2: NodeProc;
let n3: NodeProc;
let n4: NodeProc;
let n5: NodeProc;

function client(n: NodeProc): OpenAI {
  return new OpenAI({ baseURL: `${n.url}/v1`, apiKey: "unused", maxRetries: 0, timeout: 120_000 });
}

async function answers(n: NodeProc, model: string): Promise<string | null> {
  const r = await client(n).chat.completions.create({ model, messages: [{ role: "user", content: "hi" }], max_tokens: 4, temperature: 0 });
  return r.model === model ? (r.choices[0]?.finish_reason ?? null) : null;
}

// Every node in `ns` agrees on one view in which exactly `alive` are alive.
async function converged(ns: NodeProc[], alive: string[]): Promise<string | false> {
  const views = await viewsOf(ns);
  if (views.some((v) => v === null)) return false;
  const keys = new Set(views.map((v) => viewKey(v as NonNullable<typeof v>)));
  const only = [...keys][0] as string;
  return keys.size === 1 && only.startsWith(`alive=${[...alive].sort().join(",")} `) ? only : false;
}

// `who` all see every node of `gone` neither alive nor suspect.
async function seeGone(who: NodeProc[], gone: NodeProc[]): Promise<boolean> {
  const views = await viewsOf(who);
  return views.every((v) => v !== null && gone.every((g) => v.members.get(g.name) !== "alive" && v.members.get(g.name) !== "suspect"));
}

const ALL = ["n1", "n2", "n3", "n4", "n5"];

/** Prefix inserts `n`'s routing index sync applied from peers so far. */
async function applied(n: NodeProc): Promise<number> {
  return (await peersOf(n))?.routing?.sync?.insertsApplied ?? 0;
}

// The index sync caught up: `receiver` applied inserts since `before`, and no alpha owner (n1, n3) has changes pending.
async function caughtUp(receiver: NodeProc, before: number): Promise<boolean> {
  if ((await applied(receiver)) <= before) return false;
  const pending = await Promise.all([n1, n3].map(async (n) => (await peersOf(n))?.routing?.sync?.pendingOps ?? -1));
  return pending.every((p) => p === 0);
}

// A request for alpha with a long system prompt (its prefixes fill the routing index), entering at `n`.
async function longPrompt(n: NodeProc, role: string): Promise<void> {
  const system = `${role} ${"Check the tests, the names and the error paths of every change. ".repeat(30)}`;
  const r = await client(n).chat.completions.create({
    model: "alpha",
    messages: [
      { role: "system", content: system },
      { role: "user", content: "Go." },
    ],
    max_tokens: 4,
  });
  expect(r.choices[0]?.finish_reason).toBeDefined();
}

beforeAll(async () => {
  mesh = await startFaultMesh([
    { name: "n1", model: "alpha" },
    { name: "n2", model: "beta" },
    { name: "n3", model: "alpha" },
    { name: "n4", model: "gamma" },
    { name: "n5", model: "delta" },
  ]);
  [n1, n2, n3, n4, n5] = ALL.map((n) => mesh.node(n)) as [NodeProc, NodeProc, NodeProc, NodeProc, NodeProc];
  await waitFor("five nodes to converge", HEAL_MS, () => converged(mesh.nodes, ALL), 250);
});

afterAll(async () => {
  await mesh?.stop();
});

describe("a mesh under partitions and lossy links", () => {
  test("a_3_2_partition_serves_each_sides_models_and_heals_to_one_view_without_resurrecting_a_tombstone", async () => {
    const left = [n1, n2, n3];
    const right = [n4, n5];
    mesh.proxy.partition(
      left.map((n) => n.name),
      right.map((n) => n.name),
    );
    await waitFor(
      "each side to declare the other dead",
      DETECT_MS,
      async () => (await seeGone(left, right)) && (await seeGone(right, left)),
      250,
    );

    // Split for longer than the suspicion timeout: each side serves the models it still has.
    expect(await answers(n1, "alpha")).not.toBeNull();
    expect(await answers(n1, "beta")).not.toBeNull();
    expect(await answers(n4, "gamma")).not.toBeNull();
    expect(await answers(n4, "delta")).not.toBeNull();

    // n5 leaves during the split: only n4 hears it, and delta's worker becomes a tombstone there.
    n5.proc.kill("SIGTERM");
    await n5.proc.exited;
    await waitFor("n4 to drop delta", DETECT_MS, async () => {
      const v = (await viewsOf([n4]))[0];
      return v !== null && v !== undefined && !v.models.has("delta") && v.members.get("n5") !== "alive";
    });

    mesh.proxy.heal();
    const live = [n1, n2, n3, n4];
    const view = await waitFor(
      "the four live nodes to converge after healing",
      HEAL_MS,
      () => converged(live, ["n1", "n2", "n3", "n4"]),
      250,
    );
    expect(view).toBe("alive=n1,n2,n3,n4 models=alpha:n1,n3 beta:n2 gamma:n4");

    // Nothing comes back over the next push-pull exchanges: not n5, not its worker.
    const until = Date.now() + 2 * MEMBERSHIP_DEFAULTS.syncEveryRounds * MEMBERSHIP_DEFAULTS.roundMs;
    while (Date.now() < until) {
      for (const v of await viewsOf(live)) {
        expect(v?.models.has("delta")).toBe(false);
        expect(v?.members.get("n5")).not.toBe("alive");
      }
      await Bun.sleep(500);
    }
    expect(await answers(n4, "alpha")).not.toBeNull();
    expect(await answers(n1, "gamma")).not.toBeNull();
  }, 240_000);

  test("an_asymmetric_link_declares_nobody_dead", async () => {
    const live = [n1, n2, n3, n4];
    const before = await deathsOf(live);
    // n2 does not hear n1 (n1's requests to n2 and its answers to n2 vanish); n1 hears n2.
    mesh.proxy.set("n1", "n2", { cut: true });
    await Bun.sleep(2 * SUSPICION_MS);
    expect(await deathsOf(live)).toBe(before);
    mesh.proxy.heal();
    expect(await converged(live, ["n1", "n2", "n3", "n4"])).not.toBe(false);
  }, 120_000);

  test("a_flapping_link_declares_nobody_dead", async () => {
    const live = [n1, n2, n3, n4];
    const before = await deathsOf(live);
    // The n1 <-> n2 link goes down and up every second: indirect probes through n3 and n4 cover the gaps.
    for (let i = 0; i < 6; i++) {
      mesh.proxy.set("n1", "n2", { cut: true });
      mesh.proxy.set("n2", "n1", { cut: true });
      await Bun.sleep(MEMBERSHIP_DEFAULTS.roundMs);
      mesh.proxy.heal();
      await Bun.sleep(MEMBERSHIP_DEFAULTS.roundMs);
    }
    expect(await deathsOf(live)).toBe(before);
    expect(await converged(live, ["n1", "n2", "n3", "n4"])).not.toBe(false);
  }, 120_000);

  test("a_flapping_node_is_declared_dead_no_faster_than_the_suspicion_timeout_allows_and_ends_alive", async () => {
    const live = [n1, n2, n3, n4];
    const before = await deathsOf(live);
    const others = ["n2", "n3", "n4"];
    // n1 is cut off from everyone for less than the suspicion timeout, then back for as long, four times.
    const flap = SUSPICION_MS / 2.5;
    const t0 = Date.now();
    for (let i = 0; i < 4; i++) {
      mesh.proxy.partition(["n1"], others);
      await Bun.sleep(flap);
      mesh.proxy.heal();
      await Bun.sleep(flap);
    }
    // Each observer can declare n1 dead at most once per suspicion timeout, and n1 reset at most as often:
    // no dead/alive loop faster than that. (On an idle machine it is not declared dead at all.)
    const periods = Math.ceil((Date.now() - t0) / SUSPICION_MS);
    expect((await deathsOf(live)) - before).toBeLessThanOrEqual(live.length * periods);
    await waitFor("n1 alive everywhere", HEAL_MS, () => converged(live, ["n1", "n2", "n3", "n4"]), 250);
  }, 120_000);

  test("ten_percent_loss_on_every_link_declares_nobody_dead_and_the_routing_index_catches_up", async () => {
    const live = [n1, n2, n3, n4];
    const before = await deathsOf(live);
    mesh.proxy.setAll({ drop: 0.1 });
    const start = await applied(n4);
    // A long prompt entering at n3 (alpha runs on n1 or n3): its prefixes reach n4's index through the lossy links.
    await longPrompt(n3, "You keep the build green.");
    await waitFor("the new prefixes in n4's index", HEAL_MS, () => caughtUp(n4, start), 250);
    await Bun.sleep(SUSPICION_MS);
    expect(await deathsOf(live)).toBe(before);
    mesh.proxy.heal();
  }, 120_000);

  test("200ms_delay_on_every_link_declares_nobody_dead_and_the_routing_index_catches_up", async () => {
    const live = [n1, n2, n3, n4];
    const before = await deathsOf(live);
    // 200 ms each way: every round trip is longer than the 400 ms direct probe timeout.
    mesh.proxy.setAll({ delayMs: 200 });
    // n4 routes alpha (it asked for it earlier), so it holds alpha's index; a node that never routed a model does not.
    const start = await applied(n4);
    await longPrompt(n1, "You review pull requests.");
    await waitFor("the new prefixes in n4's index", HEAL_MS, () => caughtUp(n4, start), 250);
    await Bun.sleep(SUSPICION_MS);
    expect(await deathsOf(live)).toBe(before);
    mesh.proxy.heal();
  }, 120_000);

  test("thirty_percent_loss_with_delay_keeps_serving_and_heals_to_one_view_with_the_index_caught_up", async () => {
    const live = [n1, n2, n3, n4];
    mesh.proxy.setAll({ drop: 0.3, delayMs: 200 });
    const start = await applied(n4);
    // Each side may suspect (or declare dead) members it cannot reach through the loss; requests still run.
    await longPrompt(n3, "You triage bug reports.");
    await Bun.sleep(2 * SUSPICION_MS);
    mesh.proxy.heal();
    // Nobody live stays dead once the links heal, and the index sync catches up.
    await waitFor("the live nodes to converge after the lossy period", HEAL_MS, () => converged(live, ["n1", "n2", "n3", "n4"]), 250);
    await waitFor("the new prefixes in n4's index", HEAL_MS, () => caughtUp(n4, start), 250);
  }, 180_000);
});
