// Grammar-constrained sampling and logprobs on the real engine (tiny random-weight model): the
// grammar makes the output valid even though the weights mean nothing.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { collect, Engine, EngineError, type TokenLogprob } from "../../src/engine/index";
import { jsonObjectGrammar, schemaGrammar } from "../../src/server/structured/json-schema";
import { tinyModel } from "../helpers/model";
import { SCHEMAS } from "../helpers/schemas";
import { validate } from "../helpers/validate";

let engine: Engine;

beforeAll(async () => {
  engine = await Engine.load({ modelPath: await tinyModel(), nCtx: 8192, nParallel: 4, nBatch: 512, threads: 2 });
});
afterAll(async () => {
  await engine?.close();
});

const greedy = { temperature: 0 };
const prompt = "<|user|>\nDescribe a person as JSON.<|end|>\n<|assistant|>\n";

async function generate(grammar: string | undefined, sampling: object = greedy, maxTokens = 400, p = prompt) {
  return collect(engine.generate({ prompt: p, maxTokens, sampling, grammar }));
}

describe("grammar-constrained generation on the tiny model", () => {
  for (const [name, schema] of Object.entries(SCHEMAS)) {
    test(`schema_${name}_output_parses_and_validates`, async () => {
      const r = await generate(schemaGrammar(schema, "schema"));
      // The grammar ends only where the JSON is complete, and then only the end of generation is allowed.
      expect(r.done.finishReason).toBe("stop");
      const value = JSON.parse(r.text);
      expect(validate(value, schema)).toEqual([]);
    });
  }

  test("sampled_output_with_penalties_still_validates", async () => {
    // Prompt tokens go to the penalties, never to the grammar; sampling picks only grammar-allowed tokens.
    for (const seed of [1, 2, 3]) {
      const r = await generate(schemaGrammar(SCHEMAS.person, "schema"), {
        temperature: 1.2,
        seed,
        repeatPenalty: 1.3,
        topK: 0,
        topP: 1,
        minP: 0,
      });
      expect(validate(JSON.parse(r.text), SCHEMAS.person as Record<string, unknown>)).toEqual([]);
    }
  });

  test("json_object_grammar_gives_a_json_object", async () => {
    // Any JSON may nest and run on forever; on these random weights, this prompt's greedy object closes.
    const r = await generate(jsonObjectGrammar(), greedy, 400, "<|user|>\nGive me JSON.<|end|>\n<|assistant|>\n");
    expect(r.done.finishReason).toBe("stop");
    const value = JSON.parse(r.text);
    expect(typeof value === "object" && value !== null && !Array.isArray(value)).toBe(true);
  });

  test("batched_constrained_and_free_generations_do_not_mix", async () => {
    const free = await generate(undefined, greedy, 24);
    const [a, b, c] = await Promise.all([
      generate(schemaGrammar(SCHEMAS.person, "schema")),
      generate(undefined, greedy, 24),
      generate(schemaGrammar(SCHEMAS.list, "schema")),
    ]);
    expect(validate(JSON.parse(a?.text ?? ""), SCHEMAS.person as Record<string, unknown>)).toEqual([]);
    expect(b?.tokens).toEqual(free.tokens);
    expect(validate(JSON.parse(c?.text ?? ""), SCHEMAS.list as Record<string, unknown>)).toEqual([]);
  });

  test("a_grammar_that_does_not_parse_fails_the_request_as_invalid", async () => {
    const err = await generate('root ::= "unclosed').catch((e) => e);
    expect(err).toBeInstanceOf(EngineError);
    expect((err as EngineError).code).toBe("invalid_request");
    expect((err as EngineError).message).toContain("grammar");
    // The engine goes on serving.
    expect((await generate(undefined, greedy, 4)).done.completionTokens).toBe(4);
  });
});

async function withEvents(opts: Parameters<Engine["generate"]>[0]) {
  const events: { kind: string; text?: string; tokens?: number[]; logprobs?: TokenLogprob[] }[] = [];
  for await (const e of engine.generate(opts)) events.push(e);
  return events;
}

describe("logprobs on the tiny model", () => {
  test("greedy_tokens_are_unchanged_by_logprobs_and_are_the_top_entry", async () => {
    const plain = await collect(engine.generate({ prompt, maxTokens: 16, sampling: greedy, ignoreEos: true }));
    const events = await withEvents({ prompt, maxTokens: 16, sampling: greedy, ignoreEos: true, logprobs: 5 });
    const tokens = events.flatMap((e) => e.tokens ?? []);
    expect(tokens).toEqual(plain.tokens);
    const lps = events.flatMap((e) => e.logprobs ?? []);
    expect(lps.map((l) => l.token)).toEqual(tokens);
    for (const l of lps) {
      expect(l.logprob).toBeLessThanOrEqual(0);
      expect(l.top).toHaveLength(5);
      // Greedy picks the most probable token: the top entry is the chosen one, with the same logprob.
      expect(l.top[0]?.token).toBe(l.token);
      expect(l.top[0]?.logprob).toBe(l.logprob);
      for (let i = 1; i < l.top.length; i++)
        expect((l.top[i] as { logprob: number }).logprob).toBeLessThanOrEqual(l.top[i - 1]?.logprob as number);
      const mass = l.top.reduce((sum, t) => sum + Math.exp(t.logprob), 0);
      expect(mass).toBeLessThanOrEqual(1 + 1e-5);
      expect(Buffer.from(l.bytes).length).toBe(l.bytes.length);
    }
    // The bytes of the chosen tokens spell the text.
    const text = events.map((e) => e.text ?? "").join("");
    expect(Buffer.from(lps.flatMap((l) => l.bytes)).toString("utf8")).toBe(text);
  });

  test("zero_alternatives_gives_the_chosen_token_only", async () => {
    const events = await withEvents({ prompt, maxTokens: 4, sampling: greedy, ignoreEos: true, logprobs: 0 });
    const lps = events.flatMap((e) => e.logprobs ?? []);
    expect(lps).toHaveLength(4);
    for (const l of lps) expect(l.top).toEqual([]);
  });

  test("with_a_grammar_the_alternatives_are_the_allowed_tokens_only", async () => {
    const events = await withEvents({
      prompt,
      maxTokens: 50,
      sampling: greedy,
      grammar: schemaGrammar({ enum: ["yes", "no"] }, "s"),
      logprobs: 20,
    });
    const lps = events.flatMap((e) => e.logprobs ?? []);
    expect(lps.length).toBeGreaterThan(0);
    // The first token must start `"yes"` or `"no"`: every alternative's text is a prefix of one of them.
    for (const t of lps[0]?.top ?? []) {
      const piece = Buffer.from(t.bytes).toString("utf8");
      expect(['"yes"', '"no"'].some((w) => w.startsWith(piece))).toBe(true);
    }
    expect(lps[0]?.top[0]?.token).toBe(lps[0]?.token);
    // Asking for logprobs checks every token against the grammar; without, only the pick is checked: same tokens.
    const plain = await collect(engine.generate({ prompt, maxTokens: 50, sampling: greedy, grammar: schemaGrammar(SCHEMAS.nested, "s") }));
    const checked = await withEvents({ prompt, maxTokens: 50, sampling: greedy, grammar: schemaGrammar(SCHEMAS.nested, "s"), logprobs: 1 });
    expect(checked.flatMap((e) => e.tokens ?? [])).toEqual(plain.tokens);
    // Probabilities are renormalised over what the grammar allows: they sum to about 1.
    const mass = (lps[0]?.top ?? []).reduce((sum, t) => sum + Math.exp(t.logprob), 0);
    expect(mass).toBeGreaterThan(0.99);
  });

  test("out_of_range_logprobs_are_refused", () => {
    expect(() => engine.generate({ prompt, logprobs: 21 })).toThrow(EngineError);
    expect(() => engine.generate({ prompt, logprobs: -1 })).toThrow(EngineError);
  });
});
