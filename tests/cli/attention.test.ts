// `mesh serve --attn-kernel` and `--plain-attn`, run as a user runs them: bad values are one
// line and exit 2; a node says at start which kernel and which plain window it runs, counts the
// ops of each in /metrics, and answers the same greedy text either way.
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { clusterDir, MAIN, spawnNode } from "../helpers/cluster";

const dir = mkdtempSync(join(tmpdir(), "mesh-cli-attn-"));
const nodes = clusterDir();
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
  rmSync(nodes, { recursive: true, force: true });
});

function mesh(args: string[]) {
  const env = { ...process.env, MESH_STATE_DIR: join(dir, "state-flags") };
  const r = Bun.spawnSync([process.execPath, MAIN, ...args], { stdout: "pipe", stderr: "pipe", env, timeout: 60_000 });
  return { code: r.exitCode, err: r.stderr.toString() };
}

describe("mesh serve --attn-kernel and --plain-attn", () => {
  test("bad_attn_kernel_values_are_one_line_on_stderr_and_exit_code_2", () => {
    for (const v of ["fast", "", "MESH"]) {
      const r = mesh(["serve", "--attn-kernel", v]);
      expect({ v, code: r.code }).toEqual({ v, code: 2 });
      expect(r.err).toContain("--attn-kernel");
      expect(r.err.trim().split("\n").length).toBe(1);
    }
  });

  test("bad_plain_attn_values_are_one_line_on_stderr_and_exit_code_2", () => {
    for (const v of ["12", "0:10", "20:10", "12:64", "a:b", "on"]) {
      const r = mesh(["serve", "--plain-attn", v]);
      expect({ v, code: r.code }).toEqual({ v, code: 2 });
      expect(r.err).toContain("--plain-attn");
      expect(r.err.trim().split("\n").length).toBe(1);
    }
  });

  test("a_node_logs_its_kernel_and_window_and_answers_the_same_greedy_text_with_each", async () => {
    const prompt = { role: "user", content: "Tool result: ".concat("line of output ".repeat(40)) };
    const answers: string[] = [];
    for (const [name, args, kernel, shown] of [
      ["mesh", [], "mesh", "none"],
      ["plain", ["--attn-kernel", "ggml"], "ggml", "12-63"],
      ["ggml", ["--attn-kernel", "ggml", "--plain-attn", "off"], "ggml", "none"],
    ] as const) {
      const n = await spawnNode({ name, dir: nodes, model: "tiny", args: [...args] });
      try {
        expect(n.log()).toMatch(new RegExp(`attention.*kernel[=: "]+${kernel}.*plain_for_tokens[=: "]+${shown}.*flash[=: "]+on`));
        const models = (await (await fetch(`${n.url}/v1/models`)).json()) as { data: Array<{ id: string }> };
        const model = models.data[0]?.id as string;
        type Reply = { choices: Array<{ message: { content: string } }>; usage: { prompt_tokens_details?: { cached_tokens?: number } } };
        const ask = async (messages: unknown[]) => {
          const res = await fetch(`${n.url}/v1/chat/completions`, {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify({ model, messages, max_tokens: 12, temperature: 0 }),
          });
          expect(res.status).toBe(200);
          const r = (await res.json()) as Reply;
          return { text: r.choices[0]?.message.content ?? "", cached: r.usage.prompt_tokens_details?.cached_tokens ?? 0 };
        };
        const first = await ask([prompt]);
        // The next turn: the conversation so far from cache, a short batch of new tokens (the reply, the new message).
        const next = await ask([prompt, { role: "assistant", content: first.text }, { role: "user", content: "and then?" }]);
        expect(next.cached).toBeGreaterThan(100);
        const metrics = await (await fetch(`${n.url}/metrics`)).text();
        const plainSteps = Number(/mesh_decode_steps_total\{attention="plain"\} (\d+)/.exec(metrics)?.[1]);
        const meshOps = Number(/mesh_attention_ops_total\{kernel="mesh"\} (\d+)/.exec(metrics)?.[1]);
        expect({ name, plain: plainSteps > 0, mesh: meshOps > 0 }).toEqual({ name, plain: name === "plain", mesh: name === "mesh" });
        answers.push(`${first.text}|${next.text}`);
      } finally {
        n.proc.kill("SIGKILL");
        await n.proc.exited;
      }
    }
    expect(answers[1]).toBe(answers[0] as string);
    expect(answers[2]).toBe(answers[0] as string);
  });
});
