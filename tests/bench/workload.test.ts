import { describe, expect, test } from "bun:test";
import {
  buildWorkload,
  estimatePromptTokens,
  pseudoText,
  requestBody,
  rng,
  turnMessages,
  turnsThatFit,
  type WorkloadConfig,
} from "../../src/bench/workload";

const CONFIG: WorkloadConfig = {
  seed: 7,
  loops: 4,
  turns: 3,
  systemTokens: 300,
  toolResultTokens: 120,
  userTokens: 16,
  maxTokens: 8,
  staggerMs: 500,
};

describe("kv-pressure workload", () => {
  test("same_seed_gives_byte_identical_requests", () => {
    const a = buildWorkload(CONFIG);
    const b = buildWorkload({ ...CONFIG });
    expect(a).toEqual(b);
    for (const loop of a.loops) {
      for (let k = 0; k < loop.turns.length; k++) {
        const ba = JSON.stringify(requestBody(a, "m", turnMessages(a, loop, k), loop.turns[k]?.stream ?? false));
        const bb = JSON.stringify(requestBody(b, "m", turnMessages(b, b.loops[loop.index] ?? loop, k), loop.turns[k]?.stream ?? false));
        expect(ba).toBe(bb);
      }
    }
  });

  test("another_seed_gives_another_workload", () => {
    const a = buildWorkload(CONFIG);
    const b = buildWorkload({ ...CONFIG, seed: 8 });
    expect(a.system).not.toBe(b.system);
    expect(a.loops[0]?.turns[0]?.toolResult).not.toBe(b.loops[0]?.turns[0]?.toolResult);
  });

  test("loops_share_the_system_prefix_and_start_staggered", () => {
    const w = buildWorkload(CONFIG);
    expect(w.loops).toHaveLength(4);
    expect(w.loops[0]?.startMs).toBe(0);
    for (let i = 1; i < w.loops.length; i++) {
      const start = w.loops[i]?.startMs ?? -1;
      expect(start).toBeGreaterThanOrEqual(i * CONFIG.staggerMs);
      expect(start).toBeLessThanOrEqual(i * CONFIG.staggerMs + CONFIG.staggerMs * 0.25);
    }
    const users = new Set(w.loops.flatMap((l) => l.turns.map((t) => t.user)));
    expect(users.size).toBe(CONFIG.loops * CONFIG.turns);
  });

  test("turn_messages_replay_earlier_turns_as_tool_calls_and_results", () => {
    const w = buildWorkload(CONFIG);
    const loop = w.loops[1];
    if (!loop) throw new Error("no loop");
    const m = turnMessages(w, loop, 2);
    expect(m).toHaveLength(1 + 2 * 3 + 1);
    expect(m[0]).toEqual({ role: "system", content: w.system });
    expect(m.at(-1)).toEqual({ role: "user", content: loop.turns[2]?.user ?? "" });
    const assistant = m[2];
    const tool = m[3];
    if (assistant?.role !== "assistant" || tool?.role !== "tool") throw new Error("expected a tool call and its result");
    expect(tool.tool_call_id).toBe(assistant.tool_calls[0]?.id ?? "");
    expect(JSON.parse(assistant.tool_calls[0]?.function.arguments ?? "")).toBeObject();
    // Each turn's prompt starts with the previous turn's, so it can be served from cache.
    const prev = turnMessages(w, loop, 1);
    expect(m.slice(0, prev.length - 1)).toEqual(prev.slice(0, -1));
  });

  test("request_bodies_ask_for_fixed_length_greedy_output_with_tools", () => {
    const w = buildWorkload(CONFIG);
    const loop = w.loops[0];
    if (!loop) throw new Error("no loop");
    const s = requestBody(w, "model-x", turnMessages(w, loop, 0), true) as Record<string, unknown>;
    expect(s).toMatchObject({ model: "model-x", max_tokens: 8, temperature: 0, ignore_eos: true, stream: true });
    expect(s.stream_options).toEqual({ include_usage: true });
    expect((s.tools as unknown[]).length).toBeGreaterThan(0);
    const n = requestBody(w, "model-x", turnMessages(w, loop, 0), false) as Record<string, unknown>;
    expect(n.stream).toBe(false);
    expect(n.stream_options).toBeUndefined();
  });

  test("streaming_and_non_streaming_requests_are_mixed", () => {
    const w = buildWorkload({ ...CONFIG, loops: 8, turns: 6 });
    const flags = w.loops.flatMap((l) => l.turns.map((t) => t.stream));
    expect(flags.some((f) => f)).toBe(true);
    expect(flags.some((f) => !f)).toBe(true);
  });

  test("pseudo_text_is_deterministic_and_near_the_asked_size", () => {
    const a = pseudoText(rng(3), 500);
    expect(pseudoText(rng(3), 500)).toBe(a);
    // A word or a period is about one token in the llama tokenizers.
    const units = a.split(" ").length + (a.match(/\./g)?.length ?? 0);
    expect(units).toBeGreaterThanOrEqual(500);
    expect(units).toBeLessThanOrEqual(520);
  });

  test("turns_that_fit_stay_within_the_context", () => {
    const sizes = { systemTokens: 2500, toolResultTokens: 600, userTokens: 24, maxTokens: 32 };
    const t = turnsThatFit(sizes, 8192);
    expect(t).toBeGreaterThanOrEqual(2);
    expect(estimatePromptTokens(sizes, t - 1) + 32).toBeLessThanOrEqual(8192 * 0.85);
    expect(estimatePromptTokens(sizes, t) + 32).toBeGreaterThan(8192 * 0.85);
    expect(turnsThatFit(sizes, 3000)).toBe(1);
  });
});
