import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import Anthropic from "@anthropic-ai/sdk";
import OpenAI from "openai";
import type { EngineOptions, EngineStats } from "../../src/engine";
import { FakeEngine } from "../../src/engine/fake";
import { silentLogger } from "../../src/log";
import { type RunningServer, ServedModel, startServer } from "../../src/server";
import { createApp } from "../../src/server/app";
import { Metrics } from "../../src/server/metrics";
import { tinyModel } from "../helpers/model";

type Msg = OpenAI.Chat.Completions.ChatCompletionMessageParam;

interface Node {
  server: RunningServer;
  model: ServedModel;
  client: OpenAI;
  url: string;
  close(): Promise<void>;
}

async function start(o: Partial<EngineOptions> = {}): Promise<Node> {
  const model = ServedModel.start({ modelPath: await tinyModel(), nCtx: 4096, nParallel: 2, threads: 2, ...o });
  await model.ready;
  if (model.status !== "ready") throw new Error(`model failed: ${model.error}`);
  const server = startServer({ host: "127.0.0.1", port: 0, models: [model], apiKeys: [], maxBodyBytes: 1 << 20, logger: silentLogger });
  const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: "unused", maxRetries: 0 });
  return {
    server,
    model,
    client,
    url: server.url,
    close: async () => {
      await server.close();
      await model.close();
    },
  };
}

const SYSTEM = "You are an agent working through a long task with tools. ".repeat(12);

/** One chat turn in `session` (greedy, short): the reply message and usage. */
async function ask(n: Node, session: string, messages: Msg[], extra: Partial<OpenAI.Chat.ChatCompletionCreateParamsNonStreaming> = {}) {
  const r = await n.client.chat.completions.create(
    { model: "mesh-tiny", messages, max_tokens: 6, temperature: 0, ...extra },
    { headers: { "X-Session-Id": session } },
  );
  const m = r.choices[0]?.message;
  return {
    reply: { role: "assistant", content: m?.content ?? null } as Msg,
    usage: r.usage,
    id: r.id,
    finish: r.choices[0]?.finish_reason,
  };
}

const get = async (n: Node, path: string) => {
  const r = await fetch(`${n.url}${path}`);
  return { status: r.status, body: (await r.json()) as Record<string, unknown> & { data?: Array<Record<string, unknown>> } };
};
const stats = (n: Node) => n.model.engine?.stats() as Promise<EngineStats>;

let node: Node;
beforeAll(async () => {
  node = await start();
});
afterAll(async () => {
  await node?.close();
});

describe("sessions over HTTP", () => {
  test("sequential_turns_restore_the_previous_turns_checkpoint_after_other_traffic_took_the_slots", async () => {
    const h: Msg[] = [
      { role: "system", content: SYSTEM },
      { role: "user", content: "Step one." },
    ];
    const t1 = await ask(node, "seq", h);
    // Other conversations take both slots (and, with the host tier's LRU, could push this one out).
    await Promise.all([0, 1].map((i) => ask(node, `other-${i}`, [{ role: "user", content: `unrelated ${i} `.repeat(40) }])));
    const before = await stats(node);
    const t2 = await ask(node, "seq", [...h, t1.reply, { role: "user", content: "Step two." }]);
    const after = await stats(node);
    expect(after.checkpointSaves).toBeGreaterThan(before.checkpointSaves);
    expect(after.checkpointRestores + after.hostRestores).toBeGreaterThan(before.checkpointRestores + before.hostRestores);
    expect(t2.usage?.prompt_tokens_details?.cached_tokens).toBeGreaterThan(t1.usage?.prompt_tokens ?? 0);

    const s = await get(node, "/v1/sessions/seq");
    expect(s.status).toBe(200);
    expect(s.body).toMatchObject({ id: "seq", object: "session", turns: 2, branches: 1, pending: 0 });
    const list = await get(node, "/v1/sessions");
    expect(list.body.data?.map((x) => x.id)).toContain("seq");
  });

  test("exported_tokens_line_up_with_the_servers_own_tokenization_of_the_rendered_template", async () => {
    const h: Msg[] = [
      { role: "system", content: "Be brief." },
      { role: "user", content: "Name a colour." },
    ];
    const t1 = await ask(node, "align", h, { logprobs: true });
    const h2: Msg[] = [...h, t1.reply, { role: "user", content: "Another." }];
    await ask(node, "align", h2, { logprobs: true });
    const all = await get(node, "/v1/sessions/align/trajectories?all=1");
    const [first, last] = all.body.data as Array<{
      prompt_ids: number[];
      response_ids: number[];
      response_mask: number[];
      response_logprobs: number[] | null;
      num_turns: number;
      messages: Msg[];
    }>;
    const tokenized = async (messages: Msg[]) => {
      const t = await fetch(`${node.url}/apply-template`, { method: "POST", body: JSON.stringify({ model: "mesh-tiny", messages }) });
      const { prompt } = (await t.json()) as { prompt: string };
      const k = await fetch(`${node.url}/tokenize`, {
        method: "POST",
        body: JSON.stringify({ model: "mesh-tiny", content: prompt, add_special: true }),
      });
      return ((await k.json()) as { tokens: number[] }).tokens;
    };
    // Turn 1: its prompt is exactly the server's tokenization of the rendered template, its reply all sampled.
    expect(first?.prompt_ids).toEqual(await tokenized(h));
    expect(first?.response_mask.every((m) => m === 1)).toBe(true);
    expect(first?.response_logprobs?.length).toBe(first?.response_ids.length);
    expect(first?.messages).toEqual([...h, t1.reply] as unknown as Msg[]);
    // Turn 2: what precedes its reply is the server's tokenization of the second prompt, whichever way the export chains it.
    const p2 = await tokenized(h2);
    const ids = [...(last?.prompt_ids ?? []), ...(last?.response_ids ?? [])];
    const mask = [...(last?.prompt_ids ?? []).map(() => 0), ...(last?.response_mask ?? [])];
    const sampled = mask.lastIndexOf(0) + 1;
    expect(ids.slice(0, sampled)).toEqual(p2);
    if (last?.num_turns === 2) {
      // Chained: turn 1's sampled tokens sit where the template put the reply, with mask 1 (its end-of-generation
      // token, when it stopped on one, only where the template closes the reply with that very token).
      const at = first?.prompt_ids.length ?? 0;
      const text = (first?.response_ids ?? []).slice(0, t1.finish === "stop" ? -1 : undefined);
      expect(ids.slice(at, at + text.length)).toEqual(text);
      expect(mask.slice(at, at + text.length).every((m) => m === 1)).toBe(true);
    }
    const jsonl = await fetch(`${node.url}/v1/sessions/align/trajectories?format=jsonl`);
    expect(jsonl.headers.get("content-type")).toContain("application/x-ndjson");
    const lines = (await jsonl.text()).trim().split("\n");
    expect(lines.length).toBe(1);
    expect(JSON.parse(lines[0] as string).response_ids).toEqual(last?.response_ids);
  });

  test("best_of_n_siblings_become_branches_and_a_retry_of_the_same_reply_adds_none", async () => {
    const h: Msg[] = [{ role: "user", content: "Propose a plan." }];
    const seeds = [1, 2, 3, 4];
    const replies = await Promise.all(seeds.map((seed) => ask(node, "bon", h, { temperature: 1, seed })));
    const distinct = new Set(replies.map((r) => r.reply.content)).size;
    let s = await get(node, "/v1/sessions/bon");
    expect(s.body.branches).toBe(distinct);
    expect(s.body.pending).toBe(0);
    // The same request again (a client retry) yields the same reply under the same seed: the same node.
    await ask(node, "bon", h, { temperature: 1, seed: 1 });
    s = await get(node, "/v1/sessions/bon");
    expect(s.body.branches).toBe(distinct);
    expect((await get(node, "/v1/sessions/bon/trajectories")).body.data?.length).toBe(distinct);
  });

  test("a_client_that_disconnects_mid_stream_leaves_no_pending_branch", async () => {
    await ask(node, "cancel", [{ role: "user", content: "first" }]);
    const before = (await get(node, "/v1/sessions/cancel")).body;
    const abort = new AbortController();
    const stream = await node.client.chat.completions.create(
      { model: "mesh-tiny", messages: [{ role: "user", content: "a new long question" }], max_tokens: 400, stream: true },
      { headers: { "X-Session-Id": "cancel" }, signal: abort.signal },
    );
    try {
      for await (const _ of stream) {
        abort.abort();
      }
    } catch {
      // the abort ends the iteration
    }
    let after = (await get(node, "/v1/sessions/cancel")).body;
    for (let i = 0; i < 100 && (after.pending !== 0 || after.nodes !== before.nodes); i++) {
      await Bun.sleep(50);
      after = (await get(node, "/v1/sessions/cancel")).body;
    }
    expect(after).toMatchObject({ pending: 0, nodes: before.nodes, branches: before.branches, turns: before.turns });
  });

  test("a_refused_request_leaves_no_pending_branch", async () => {
    const r = await fetch(`${node.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-session-id": "refused" },
      body: JSON.stringify({ model: "mesh-tiny", messages: [{ role: "user", content: "x ".repeat(5000) }] }),
    });
    expect(r.status).toBe(400);
    const s = await get(node, "/v1/sessions/refused");
    expect(s.body).toMatchObject({ nodes: 0, pending: 0 });
  });

  test("the_session_body_field_names_a_session_like_the_header", async () => {
    const r = await fetch(`${node.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 2, session: "by-field" }),
    });
    expect(r.status).toBe(200);
    expect(r.headers.get("x-session-id")).toBe("by-field");
    expect((await get(node, "/v1/sessions/by-field")).body.turns).toBe(1);
  });

  test("bad_session_ids_and_unknown_sessions_get_clear_errors_and_change_nothing", async () => {
    const count = (await get(node, "/v1/sessions")).body.data?.length;
    const bad = await fetch(`${node.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-session-id": "has spaces" },
      body: JSON.stringify({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 2 }),
    });
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { error: { param: string } }).error.param).toBe("session");
    const notString = await fetch(`${node.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], session: 5 }),
    });
    expect(notString.status).toBe(400);
    expect((await get(node, "/v1/sessions/nope")).status).toBe(404);
    expect((await fetch(`${node.url}/v1/sessions/nope`, { method: "DELETE" })).status).toBe(404);
    expect((await get(node, "/v1/sessions")).body.data?.length).toBe(count);
  });

  test("deleting_a_session_releases_its_checkpoints", async () => {
    await ask(node, "gone", [{ role: "user", content: "remember this" }]);
    const held = (await stats(node)).checkpoints;
    const r = await fetch(`${node.url}/v1/sessions/gone`, { method: "DELETE" });
    expect(await r.json()).toEqual({ id: "gone", object: "session.deleted", deleted: true });
    expect((await stats(node)).checkpoints).toBe(held - 1);
    expect((await get(node, "/v1/sessions/gone")).status).toBe(404);
  });
});

describe("export with checkpoints on and off", () => {
  test("a_linear_conversation_exports_the_same_token_ids_and_mask_with_checkpoints_on_or_off", async () => {
    const off = await start({ checkpointRamMiB: 0, hostCacheMiB: 0 });
    try {
      const run = async (n: Node) => {
        let h: Msg[] = [
          { role: "system", content: SYSTEM },
          { role: "user", content: "Turn 0." },
        ];
        for (let i = 1; i <= 3; i++) {
          const t = await ask(n, "linear", h);
          h = [...h, t.reply, { role: "user", content: `Turn ${i}.` }];
        }
        return (await get(n, "/v1/sessions/linear/trajectories?all=1")).body.data;
      };
      const withCheckpoints = await run(node);
      const without = await run(off);
      expect(withCheckpoints?.length).toBe(3);
      const strip = (t: Record<string, unknown>) => ({ ...t, node_id: 0 });
      expect(without?.map(strip)).toEqual(withCheckpoints?.map(strip));
      expect((await stats(off)).checkpointSaves).toBe(0);
    } finally {
      await off.close();
    }
  });
});

describe("sessions on the Anthropic and Responses APIs", () => {
  type Sess = { turns: number; branches: number; pending: number };
  const session = async (id: string) => (await get(node, `/v1/sessions/${id}`)).body as unknown as Sess;

  test("anthropic_messages_turns_with_a_session_header_extend_one_branch_and_restore_its_checkpoint", async () => {
    const anthropic = new Anthropic({
      baseURL: node.url,
      apiKey: "unused",
      maxRetries: 0,
      defaultHeaders: { "X-Session-Id": "claude-run" },
    });
    const history: Anthropic.MessageParam[] = [{ role: "user", content: "Step one." }];
    const first = await anthropic.messages
      .create({
        model: "mesh-tiny",
        max_tokens: 6,
        system: SYSTEM,
        messages: history,
        temperature: 0,
      } as Anthropic.MessageCreateParamsNonStreaming)
      .withResponse();
    expect(first.response.headers.get("x-session-id")).toBe("claude-run");
    // Other conversations take both slots, so only the session's checkpoint still holds this one.
    await Promise.all([0, 1].map((i) => ask(node, `other-a-${i}`, [{ role: "user", content: `unrelated ${i} `.repeat(40) }])));
    const before = await stats(node);
    const reply = first.data.content.map((b) => (b.type === "text" ? b.text : "")).join("");
    const second = await anthropic.messages.create({
      model: "mesh-tiny",
      max_tokens: 6,
      system: SYSTEM,
      messages: [...history, { role: "assistant", content: reply }, { role: "user", content: "Step two." }],
      temperature: 0,
    } as Anthropic.MessageCreateParamsNonStreaming);
    const after = await stats(node);
    expect(after.checkpointRestores + after.hostRestores).toBeGreaterThan(before.checkpointRestores + before.hostRestores);
    expect(second.usage.cache_read_input_tokens ?? 0).toBeGreaterThan(first.data.usage.input_tokens);
    expect(await session("claude-run")).toMatchObject({ turns: 2, branches: 1, pending: 0 });
    const [t] = (await get(node, "/v1/sessions/claude-run/trajectories")).body.data as Array<{ messages: Array<{ role: string }> }>;
    expect(t?.messages.map((m) => m.role)).toEqual(["system", "user", "assistant", "user", "assistant"]);
  });

  test("responses_turns_chained_by_previous_response_id_extend_one_session_branch", async () => {
    const headers = { "X-Session-Id": "codex-run" };
    const first = await node.client.responses.create(
      { model: "mesh-tiny", instructions: "Be brief.", input: "Step one.", max_output_tokens: 6, temperature: 0 },
      { headers },
    );
    await node.client.responses.create(
      // Instructions are not carried over from the previous response (OpenAI's rule): sent again, the same system message.
      {
        model: "mesh-tiny",
        instructions: "Be brief.",
        previous_response_id: first.id,
        input: "Step two.",
        max_output_tokens: 6,
        temperature: 0,
      },
      { headers },
    );
    expect(await session("codex-run")).toMatchObject({ turns: 2, branches: 1, pending: 0 });
    // Or named in the body, as with chat completions, for clients that cannot set headers.
    const res = await fetch(`${node.url}/v1/responses`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "mesh-tiny", input: "Hi", max_output_tokens: 2, session: "codex-body" }),
    });
    expect(res.status).toBe(200);
    expect(res.headers.get("x-session-id")).toBe("codex-body");
    expect((await session("codex-body")).turns).toBe(1);
  });

  test("a_bad_session_id_on_messages_is_an_anthropic_400_naming_session_and_creates_nothing", async () => {
    const res = await fetch(`${node.url}/v1/messages`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-session-id": "bad id!" },
      body: JSON.stringify({ model: "mesh-tiny", max_tokens: 2, messages: [{ role: "user", content: "Hi" }] }),
    });
    expect(res.status).toBe(400);
    const body = (await res.json()) as { type: string; error: { type: string; message: string } };
    expect(body.type).toBe("error");
    expect(body.error.type).toBe("invalid_request_error");
    expect(body.error.message).toContain("session");
    const list = await get(node, "/v1/sessions");
    expect(list.body.data?.map((x) => x.id)).not.toContain("bad id!");
  });
});

describe("the end-of-generation token in trajectories (fake engine)", () => {
  // The fake stops every reply on its end-of-generation token (257) unless max_tokens cuts it short.
  const EOG = 257;
  const engine = new FakeEngine({ reply: "ok" });
  const model = ServedModel.fromEngine("fake-model", engine);
  const app = createApp({ models: [model], apiKeys: [], maxBodyBytes: 1 << 20, logger: silentLogger, metrics: new Metrics() });
  /** POST `body` to `path` as a turn of `session`. */
  const post = (path: string, session: string, body: object) =>
    app.handle(
      new Request(`http://localhost${path}`, {
        method: "POST",
        headers: { "content-type": "application/json", "X-Session-Id": session },
        body: JSON.stringify(body),
      }),
    );
  const chat = async (session: string, messages: unknown[], extra: Record<string, unknown> = {}) => {
    const res = await post("/v1/chat/completions", session, { model: "fake-model", messages, ...extra });
    expect(res.status).toBe(200);
    return (await res.json()) as { choices: Array<{ message: { content: string }; finish_reason: string }> };
  };
  type Exported = { response_ids: number[]; response_mask: number[]; response_logprobs: number[] | null; num_turns: number };
  const trajectories = async (session: string, all = false) => {
    const res = await app.handle(new Request(`http://localhost/v1/sessions/${session}/trajectories${all ? "?all=1" : ""}`));
    return ((await res.json()) as { data: Exported[] }).data;
  };

  // Regression: the token a reply stopped on was missing from response_ids, so a trainer never saw the model's choice to stop.
  test("a_reply_that_stopped_on_its_end_of_generation_token_exports_it_as_sampled", async () => {
    const h = [{ role: "user", content: "hi" }];
    const a1 = await chat("eog", h);
    expect(a1.choices[0]?.finish_reason).toBe("stop");
    const a2 = await chat("eog", [...h, a1.choices[0]?.message, { role: "user", content: "and?" }]);
    expect(a2.choices[0]?.finish_reason).toBe("stop");
    const [t] = await trajectories("eog");
    expect(t?.num_turns).toBe(2);
    // Each reply is "ok" (bytes 111, 107); the fallback template closes a reply with its own markup, so only the
    // last reply's end token is in the trajectory, at its end, sampled.
    const text = (ids: number[]) => ids.filter((id) => id < 256);
    expect(t?.response_ids.slice(0, 2)).toEqual([111, 107]);
    expect(t?.response_ids.at(-1)).toBe(EOG);
    expect(t?.response_mask.at(-1)).toBe(1);
    expect(t?.response_ids.filter((id) => id === EOG).length).toBe(1);
    // The engine's log-probability of the end token is checked on the real engine (tests/engine/engine.test.ts).
    expect(t?.response_logprobs).toBeNull();
    expect(text(t?.response_ids ?? []).length).toBe((t?.response_ids.length ?? 0) - 1);
    // On its own, the first reply ends with the token it stopped on too.
    const first = (await trajectories("eog", true)).find((x) => x.num_turns === 1);
    expect(first?.response_ids).toEqual([111, 107, EOG]);
    expect(first?.response_mask).toEqual([1, 1, 1]);
  });

  test("ignore_eos_replies_export_no_end_token", async () => {
    await chat("no-eog", [{ role: "user", content: "hi" }], { ignore_eos: true });
    const [t] = await trajectories("no-eog");
    expect(t?.response_ids).toEqual([111, 107]);
  });

  test("a_streamed_messages_turn_and_a_responses_turn_join_their_sessions", async () => {
    const streamed = await post("/v1/messages", "m-stream", {
      model: "fake-model",
      max_tokens: 8,
      stream: true,
      messages: [{ role: "user", content: "hi" }],
    });
    expect(streamed.headers.get("x-session-id")).toBe("m-stream");
    expect(await streamed.text()).toContain("message_stop");
    const [m] = await trajectories("m-stream");
    expect(m?.response_ids).toEqual([111, 107, EOG]);
    const res = await post("/v1/responses", "r-1", { model: "fake-model", input: "hi" });
    expect(res.status).toBe(200);
    expect(res.headers.get("x-session-id")).toBe("r-1");
    expect((await trajectories("r-1"))[0]?.response_ids).toEqual([111, 107, EOG]);
  });

  test("a_bad_session_on_responses_is_a_400_with_param_session_and_creates_nothing", async () => {
    for (const [session, body] of [
      ["bad id!", {}],
      [null, { session: 42 }],
    ] as const) {
      const res = await app.handle(
        new Request("http://localhost/v1/responses", {
          method: "POST",
          headers: { "content-type": "application/json", ...(session ? { "X-Session-Id": session } : {}) },
          body: JSON.stringify({ model: "fake-model", input: "hi", ...body }),
        }),
      );
      expect(res.status).toBe(400);
      expect(((await res.json()) as { error: { param: string } }).error.param).toBe("session");
    }
    const list = (await (await app.handle(new Request("http://localhost/v1/sessions"))).json()) as { data: Array<{ id: string }> };
    expect(list.data.map((x) => x.id)).not.toContain("bad id!");
  });

  test("a_reply_cut_short_by_max_tokens_exports_no_end_token", async () => {
    const a = await chat("cut", [{ role: "user", content: "hi" }], { max_tokens: 1 });
    expect(a.choices[0]?.finish_reason).toBe("length");
    const [t] = await trajectories("cut");
    expect(t?.response_ids).toEqual([111]);
    expect(t?.response_mask).toEqual([1]);
  });
});
