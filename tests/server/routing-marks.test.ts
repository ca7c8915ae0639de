// What a node claims its KV holds for a chat request: only what the conversation's next turn will
// render the same way. In process over FakeEngine (which records marks), through the app.
import { describe, expect, test } from "bun:test";
import type { GenerateOptions, Generation } from "../../src/engine";
import { FakeEngine } from "../../src/engine/fake";
import { silentLogger } from "../../src/log";
import type { WorkerInfo } from "../../src/mesh/wire";
import { ServedModel } from "../../src/server";
import { createApp } from "../../src/server/app";
import { ChatTemplate } from "../../src/server/chat";
import { Metrics } from "../../src/server/metrics";
import { testMeshHooks, workerRecord } from "../helpers/mesh";

const SELF = "a".repeat(32);

/** A FakeEngine that records the marks it was given and the reply marks attached after. */
class Recording extends FakeEngine {
  readonly marks: Array<NonNullable<GenerateOptions["marks"]>> = [];
  readonly replies: Array<Array<[string, string | null]>> = [];
  clears = 0;
  override generate(opts: GenerateOptions): Generation {
    this.marks.push(opts.marks ?? []);
    return super.generate(opts);
  }
  override addMarks(id: number, marks: Array<[string, string | null]>): void {
    this.replies.push(marks);
    super.addMarks(id, marks);
  }
  override clearMarks(): void {
    this.clears++;
    super.clearMarks();
  }
}

function node(engine: Recording, template?: ChatTemplate) {
  const model = ServedModel.fromEngine("mesh-tiny", engine);
  if (template) model.template = template;
  const workers = (): WorkerInfo[] => [workerRecord({ id: `${SELF}-w`, nodeId: SELF, addr: "127.0.0.1:1" })];
  const app = createApp({
    models: [model],
    apiKeys: [],
    maxBodyBytes: 1 << 20,
    logger: silentLogger,
    metrics: new Metrics(),
    mesh: testMeshHooks({ nodeId: SELF, workers }),
  });
  const chat = async (messages: unknown[]) => {
    const r = await app.handle(
      new Request("http://localhost/v1/chat/completions", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: "mesh-tiny", messages, max_tokens: 8 }),
      }),
    );
    expect(r.status).toBe(200);
    // Reply marks are checked after the answer went out.
    await Bun.sleep(20);
    return (await r.json()) as { choices: Array<{ message: { content: string } }> };
  };
  return { chat, model };
}

const tokens = { bosToken: "", eosToken: "" };
const conversation = [
  { role: "system", content: "You are terse." },
  { role: "user", content: "Say hello." },
];

describe("what a node claims its KV holds", () => {
  test("a_prefix_stable_template_marks_every_block_and_the_reply", async () => {
    const engine = new Recording({ reply: "hello there" });
    const { chat } = node(engine);
    await chat(conversation);
    expect(engine.marks[0]?.length).toBe(2);
    expect(engine.replies).toHaveLength(1);
  });

  test("a_template_that_prints_the_system_prompt_in_the_last_user_turn_marks_nothing_past_what_the_next_turn_renders_alike", async () => {
    // Like Mistral-Nemo: the system text goes into the last user turn, so turn 2 renders turn 1's prompt differently.
    const src =
      "{%- set sys = messages[0].content if messages[0].role == 'system' else '' -%}{%- set msgs = messages[1:] if messages[0].role == 'system' else messages -%}" +
      "{%- for m in msgs -%}{%- if m.role == 'user' -%}[INST]{%- if loop.last and sys -%}{{ sys }}\n\n{%- endif -%}{{ m.content }}[/INST]{%- else -%}{{ m.content }}</s>{%- endif -%}{%- endfor -%}";
    const template = new ChatTemplate(src, tokens);
    expect(template.stability.prefixStable).toBe(false);
    const engine = new Recording({ reply: "hello there" });
    const { chat } = node(engine, template);
    await chat([...conversation, { role: "assistant", content: "hi" }, { role: "user", content: "Again." }]);
    // Blocks: system, user, assistant, user. The first user turn renders alike next time; nothing after the system moves.
    const marks = engine.marks[0] ?? [];
    expect(marks.length).toBeGreaterThan(0);
    expect(marks.length).toBeLessThan(4);
  });

  test("a_reply_the_template_renders_back_differently_gets_no_reply_marks", async () => {
    // The template trims content: a reply with leading space is not what the next turn renders.
    const src =
      "{%- for m in messages -%}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>{%- endfor -%}{%- if add_generation_prompt -%}<assistant>{%- endif -%}";
    const template = new ChatTemplate(src, tokens);
    expect(template.stability.prefixStable).toBe(true);
    const trimmed = new Recording({ reply: "  hello there" });
    await node(trimmed, template).chat(conversation);
    expect(trimmed.replies).toHaveLength(0);
    const plain = new Recording({ reply: "hello there" });
    await node(plain, template).chat(conversation);
    expect(plain.replies).toHaveLength(1);
  });

  test("a_template_that_prints_the_date_drops_every_claim_when_the_day_changes", async () => {
    let now = new Date(Date.UTC(2026, 11, 5, 23, 59));
    const src = "Today is {{ strftime_now('%d %b %Y') }}.{%- for m in messages -%}<{{ m.role }}>{{ m.content }}{%- endfor -%}<assistant>";
    const template = new ChatTemplate(src, { ...tokens, now: () => now });
    expect(template.stability.dateDependent).toBe(true);
    const engine = new Recording({ reply: "hello" });
    const { chat } = node(engine, template);
    await chat(conversation);
    await chat(conversation);
    expect(engine.clears).toBe(0);
    now = new Date(Date.UTC(2026, 11, 6, 0, 1));
    await chat(conversation);
    expect(engine.clears).toBe(1);
  });

  test("a_cancelled_non_streaming_chat_attaches_no_reply_marks", async () => {
    const engine = new Recording({ reply: "a long answer that takes a while to come out", tokenDelayMs: 20 });
    const model = ServedModel.fromEngine("mesh-tiny", engine);
    const app = createApp({
      models: [model],
      apiKeys: [],
      maxBodyBytes: 1 << 20,
      logger: silentLogger,
      metrics: new Metrics(),
      mesh: testMeshHooks({ nodeId: SELF, workers: () => [workerRecord({ id: `${SELF}-w`, nodeId: SELF, addr: "127.0.0.1:1" })] }),
    });
    const abort = new AbortController();
    const pending = app
      .handle(
        new Request("http://localhost/v1/chat/completions", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ model: "mesh-tiny", messages: conversation }),
          signal: abort.signal,
        }),
      )
      .catch(() => null);
    await Bun.sleep(60);
    abort.abort();
    await pending;
    await Bun.sleep(50);
    expect(engine.replies).toHaveLength(0);
  });
});
