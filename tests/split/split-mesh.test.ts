// Real `mesh serve` processes on loopback: a head serving a model split over
// one and two stage peers (--offer-stage) answers with exactly the greedy
// tokens of a node serving it whole; a stage killed mid-stream fails the
// stream with an error event, and the head re-plans and serves again.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import OpenAI from "openai";
import { runKvPressure } from "../../src/bench/kv-pressure";
import { clusterDir, metricOf, type NodeProc, peersOf, spawnNode, tokenOf, waitFor } from "../helpers/cluster";

const nodes: NodeProc[] = [];
let dir: string;
let whole: NodeProc;
let stageA: NodeProc;
let stageB: NodeProc;
let token: string;

const client = (n: NodeProc) => new OpenAI({ baseURL: `${n.url}/v1`, apiKey: "unused", maxRetries: 0, timeout: 120_000 });
const PROMPTS = ["Tell me about meshes", "Count to ten"];
// Greedy, long enough to cross every stage many times; EOS ignored so every run decodes the same count.
const body = (content: string) => ({
  model: "big",
  messages: [{ role: "user" as const, content }],
  max_tokens: 24,
  temperature: 0,
  ignore_eos: true,
});

async function answers(n: NodeProc): Promise<{ plain: string[]; streamed: string[] }> {
  const c = client(n);
  const plain: string[] = [];
  const streamed: string[] = [];
  for (const p of PROMPTS) {
    plain.push((await c.chat.completions.create(body(p))).choices[0]?.message.content ?? "");
    let text = "";
    for await (const chunk of await c.chat.completions.create({ ...body(p), stream: true })) text += chunk.choices[0]?.delta.content ?? "";
    streamed.push(text);
  }
  return { plain, streamed };
}

async function start(name: string, model: string, args: string[]): Promise<NodeProc> {
  const n = await spawnNode({ name, dir, model, args });
  nodes.push(n);
  return n;
}

async function stop(n: NodeProc): Promise<void> {
  n.proc.kill("SIGTERM");
  await n.proc.exited;
}

beforeAll(async () => {
  dir = clusterDir();
  // The stage nodes serve the same tiny file under other names: requests for "big" can only run on a head.
  stageA = await start("stage-a", "filler-a", ["--offer-stage"]);
  token = tokenOf(stageA);
  stageB = await start("stage-b", "filler-b", ["--join", token, "--offer-stage"]);
  whole = await start("whole", "big", []); // a mesh of its own
}, 240_000);

afterAll(() => {
  for (const n of nodes) n.proc.kill("SIGKILL");
});

describe("split model over mesh serve processes", () => {
  test("gives_the_same_greedy_tokens_over_two_and_three_nodes_as_whole_streamed_and_not", async () => {
    const want = await answers(whole);
    expect(want.plain).toEqual(want.streamed);
    expect(want.plain.every((t) => t.length > 0)).toBe(true);

    const two = await start("head-2", "big", ["--join", token, "--split", "2"]);
    const models = (await (await fetch(`${two.url}/v1/models`)).json()) as {
      data: Array<{ id: string; split?: { state: string; stages: Array<{ role: string; layers: number }> } }>;
    };
    const split = models.data.find((m) => m.id === "big")?.split;
    expect(split?.state).toBe("split");
    expect(split?.stages.map((s) => s.role)).toEqual(["head", "stage"]);
    expect(split?.stages.reduce((a, s) => a + s.layers, 0)).toBe(3); // 2 blocks and the output layer
    expect(await answers(two)).toEqual(want);
    await stop(two);

    // A small KV pool, so that the kv-pressure run below queues and evicts on the split model.
    const three = await start("head-3", "big", ["--join", token, "--split", "3", "--ctx-size", "1024"]);
    expect(await answers(three)).toEqual(want);
    // Routing: a stage node that does not serve "big" forwards it to the head, which answers it split.
    const routed = await waitFor(
      "a stage node routing 'big' to the head",
      30_000,
      async () => {
        try {
          return (await client(stageA).chat.completions.create(body(PROMPTS[0] as string))).choices[0]?.message.content ?? null;
        } catch {
          return null;
        }
      },
      200,
    );
    expect(routed).toBe(want.plain[0] as string);
    expect(await metricOf(three, 'mesh_split_serving{model="big"}')).toBe(1);
    const report = await waitFor("the split in the head's peers report", 10_000, async () => {
      const r = await peersOf(three);
      return r?.splits?.length === 1 && (r.stages ?? []).filter((s) => s.in_use).length === 2 ? r : null;
    });
    expect(report.splits?.[0]?.stages.map((s) => s.role)).toEqual(["head", "stage", "stage"]);

    // A real stage's tunnel port, spoken to as ggml's RPC client would without the mesh secret: closed after the challenge.
    const tunnel = (report.stages ?? [])[0]?.tunnel as string;
    const got = await new Promise<number>((resolve) => {
      let n = 0;
      const s = connect({ host: "127.0.0.1", port: Number(tunnel.slice(tunnel.lastIndexOf(":") + 1)) }, () =>
        s.write(Buffer.concat([Buffer.from([14]), Buffer.alloc(8), Buffer.alloc(200, 7)])),
      );
      s.on("data", (d: Buffer) => {
        n += d.length;
      });
      s.on("close", () => resolve(n));
      s.on("error", () => {});
    });
    expect(got).toBe(32);
    await waitFor("the refusal in a stage's log", 10_000, async () =>
      [stageA, stageB].some((n) => n.log().includes("stage_tunnel_refused")),
    );
  }, 300_000);

  test("runs_the_kv_pressure_bench_on_a_split_model_without_decode_failures_or_5xx", async () => {
    const head = nodes.find((n) => n.name === "head-3") as NodeProc;
    const out = mkdtempSync(join(tmpdir(), "mesh-split-kvp-"));
    const { report } = await runKvPressure({ tiny: true, url: head.url, model: "big", out });
    const t = report.targets[0];
    expect(t).toMatchObject({ requests: t?.successes, status5xx: 0, transportErrors: 0 });
    expect(t?.decodeFailures.client).toBe(0);
    expect(t?.decodeFailures.server ?? 0).toBe(0);
    expect(t?.requests).toBeGreaterThan(0);
    // And under pressure, not only under load (the head's 1024-cell pool): requests waited and idle prefixes were evicted.
    expect(t?.kvCellsTotal).toBe(1024);
    expect(t?.admissions.queued as number).toBeGreaterThan(0);
    expect(t?.evictions.count as number).toBeGreaterThan(0);
    expect(await metricOf(head, 'mesh_split_serving{model="big"}')).toBe(1);
  }, 300_000);

  test("fails_a_stream_with_an_error_event_when_a_stage_is_killed_and_serves_again_after_re_planning", async () => {
    const head = nodes.find((n) => n.name === "head-3") as NodeProc;
    const c = client(head);
    const stream = await c.chat.completions.create({ ...body("A long story"), max_tokens: 4000, stream: true });
    let got = 0;
    let killedAt = 0;
    let error: unknown = null;
    try {
      for await (const chunk of stream) {
        got += chunk.choices[0]?.delta.content?.length ?? 0;
        if (got > 0 && killedAt === 0) {
          killedAt = performance.now();
          stageB.proc.kill("SIGKILL");
        }
      }
    } catch (e) {
      error = e;
    }
    const failedAfterMs = performance.now() - killedAt;
    expect(killedAt).toBeGreaterThan(0);
    expect(error).not.toBeNull(); // an error event, not a clean end and not a hang
    // The server's own SSE error event: the client's timeout (a hang) is an APIConnectionError, which would pass the line above.
    expect(error).toBeInstanceOf(OpenAI.APIError);
    expect(error).not.toBeInstanceOf(OpenAI.APIConnectionError);
    expect((error as Error).message).toMatch(/stage|engine/);
    console.log(`stream failed ${Math.round(failedAfterMs)} ms after the stage was killed`);
    // The head re-plans over what is left (stage A) and answers again.
    const r = await waitFor(
      "a reply after re-planning",
      90_000,
      async () => {
        try {
          return (await c.chat.completions.create(body(PROMPTS[0] as string))).choices[0]?.message.content ?? null;
        } catch {
          return null;
        }
      },
      500,
    );
    expect(r.length).toBeGreaterThan(0);
    // Over the stage left, not alone: the model fits here too, but a split was asked for and a stage remains.
    const models = (await (await fetch(`${head.url}/v1/models`)).json()) as {
      data: Array<{ id: string; split?: { state: string; stages: Array<{ role: string }> } }>;
    };
    expect(models.data.find((m) => m.id === "big")?.split).toMatchObject({ state: "split", stages: [{ role: "head" }, { role: "stage" }] });
    expect(await metricOf(head, 'mesh_split_stages_lost_total{model="big"}')).toBeGreaterThanOrEqual(1);
    expect(await metricOf(head, 'mesh_split_replans_total{model="big"}')).toBeGreaterThanOrEqual(1);
    expect(head.log()).toContain("re-planning");
  }, 180_000);

  test("loads_the_model_whole_when_the_last_stage_leaves_while_idle_and_it_fits_here", async () => {
    const head = nodes.find((n) => n.name === "head-3") as NodeProc;
    const lostBefore = await metricOf(head, 'mesh_split_stages_lost_total{model="big"}');
    stageA.proc.kill("SIGKILL");
    const state = await waitFor(
      "the head serving whole",
      90_000,
      async () => {
        const models = (await (await fetch(`${head.url}/v1/models`)).json()) as { data: Array<{ id: string; split?: { state: string } }> };
        const st = models.data.find((m) => m.id === "big")?.split?.state;
        return st === "solo" ? st : null;
      },
      200,
    );
    expect(state).toBe("solo");
    expect(await metricOf(head, 'mesh_split_stages_lost_total{model="big"}')).toBe(lostBefore + 1);
    const r = await client(head).chat.completions.create(body(PROMPTS[1] as string));
    expect(r.choices[0]?.message.content?.length).toBeGreaterThan(0);
    expect(head.log()).toContain("re-planned onto this node alone");
  }, 120_000);

  test("stops_a_stage_node_on_sigterm_though_its_rpc_server_never_returns", async () => {
    const c = await start("stage-c", "filler-c", ["--join", token, "--offer-stage"]);
    c.proc.kill("SIGTERM");
    expect(await c.proc.exited).toBe(0);
    expect(c.log()).toContain("stopped");
  }, 120_000);
});
