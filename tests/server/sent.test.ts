// The body as sent is checked against each route's schema before Elysia's
// validation coerces it: a string sent where an array of objects is expected
// used to become an array (chat's `messages: "hi"` came back as the misleading
// `messages[0].role`), and "5" passed for an integer. One check, on every route.
import { describe, expect, test } from "bun:test";
import { FakeEngine } from "../../src/engine/fake";
import { silentLogger } from "../../src/log";
import { createApp } from "../../src/server/app";
import { Metrics } from "../../src/server/metrics";
import { ServedModel } from "../../src/server/model";
import { testMeshHooks, workerRecord } from "../helpers/mesh";

const MODEL = "fake-model";
const user = [{ role: "user", content: "Hi" }];

function fakeApp(mesh = false) {
  const engine = new FakeEngine({ reply: "ok" });
  const self = "a".repeat(32);
  const hooks = mesh
    ? testMeshHooks({ nodeId: self, workers: () => [workerRecord({ id: "w", nodeId: self, addr: "x:1", models: [MODEL] })] })
    : undefined;
  const app = createApp({
    models: [ServedModel.fromEngine(MODEL, engine)],
    apiKeys: [],
    maxBodyBytes: 1 << 20,
    logger: silentLogger,
    metrics: new Metrics(),
    mesh: hooks,
  });
  const post = async (path: string, body: unknown) => {
    const r = await app.handle(
      new Request(`http://localhost${path}`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
      }),
    );
    return { status: r.status, body: (await r.json()) as Record<string, unknown> };
  };
  return { post, engine };
}

type OpenAiError = { error: { message: string; param: string | null; code: string } };

describe("the body as sent", () => {
  for (const mesh of [false, true]) {
    test(`a_string_sent_where_an_array_is_expected_is_a_400_naming_that_field_not_its_first_element${mesh ? "_in_a_mesh" : ""}`, async () => {
      const { post, engine } = fakeApp(mesh);
      const cases: Array<[string, unknown, string]> = [
        ["/v1/chat/completions", { model: MODEL, messages: "hi" }, "messages"],
        ["/v1/chat/completions", { model: MODEL, messages: user, tools: "get_weather" }, "tools"],
        ["/v1/chat/completions", { model: MODEL, messages: [{ role: "user", content: "x", tool_calls: "ab" }] }, "messages[0].tool_calls"],
        ["/v1/responses", { model: MODEL, input: "hi", tools: "get_weather" }, "tools"],
        ["/apply-template", { messages: "hi" }, "messages"],
        ["/detokenize", { tokens: "1 2" }, "tokens"],
      ];
      for (const [path, body, param] of cases) {
        const r = await post(path, body);
        expect({ path, param, status: r.status }).toEqual({ path, param, status: 400 });
        const e = (r.body as OpenAiError).error;
        expect({ path, param: e.param }).toEqual({ path, param });
        expect(e.message).toContain(`'${param}'`);
        expect(e.message).toContain("array");
      }
      // Anthropic's route, in Anthropic's shape and path style.
      const m = await post("/v1/messages", { model: MODEL, max_tokens: 4, messages: "hi" });
      expect(m.status).toBe(400);
      const message = (m.body as { error: { message: string } }).error.message;
      expect(message).toContain("messages");
      expect(message).not.toContain("messages.0");
      expect((await engine.stats()).admitted).toBe(0);
    });
  }

  test("a_number_sent_as_a_string_is_a_400_naming_the_field_rather_than_coerced", async () => {
    const { post, engine } = fakeApp();
    const cases: Array<[string, unknown, string]> = [
      ["/v1/chat/completions", { model: MODEL, messages: user, max_tokens: "5" }, "max_tokens"],
      ["/v1/completions", { model: MODEL, prompt: "Hi", max_tokens: "5" }, "max_tokens"],
      ["/v1/responses", { model: MODEL, input: "Hi", max_output_tokens: "5" }, "max_output_tokens"],
      ["/detokenize", { tokens: [104, "105"] }, "tokens[1]"],
    ];
    for (const [path, body, param] of cases) {
      const r = await post(path, body);
      expect({ path, status: r.status }).toEqual({ path, status: 400 });
      expect({ path, param: (r.body as OpenAiError).error.param }).toEqual({ path, param });
    }
    expect((await engine.stats()).admitted).toBe(0);
    // The same values with their own types still pass.
    expect((await post("/v1/chat/completions", { model: MODEL, messages: user, max_tokens: 5 })).status).toBe(200);
    expect((await post("/v1/completions", { model: MODEL, prompt: ["Hi"], max_tokens: 5 })).status).toBe(200);
  });
});
