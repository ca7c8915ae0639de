// `mesh serve`'s session flags, run as a user runs them: bad values are one line and exit 2, and a
// node restarted on the same state dir finds the checkpoints it spilled to disk and restores them.
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { MAIN, spawnNode } from "../helpers/cluster";

const dir = mkdtempSync(join(tmpdir(), "mesh-cli-sessions-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function mesh(args: string[]) {
  const env = { ...process.env, MESH_STATE_DIR: join(dir, "state-flags") };
  const r = Bun.spawnSync([process.execPath, MAIN, ...args], { stdout: "pipe", stderr: "pipe", env, timeout: 60_000 });
  return { code: r.exitCode, err: r.stderr.toString() };
}

describe("mesh serve session flags", () => {
  test("bad_session_and_checkpoint_flags_are_one_line_on_stderr_and_exit_code_2", () => {
    const cases: Array<[string[], string]> = [
      [["serve", "--session-ttl", "0"], "--session-ttl"],
      [["serve", "--session-ttl", "abc"], "--session-ttl"],
      [["serve", "--sessions-max", "0"], "--sessions-max"],
      [["serve", "--sessions-memory", "0"], "--sessions-memory"],
      [["serve", "--checkpoint-ram", "-1"], "--checkpoint-ram"],
      [["serve", "--checkpoint-disk", "x"], "--checkpoint-disk"],
    ];
    for (const [args, needle] of cases) {
      const r = mesh(args);
      expect({ args, code: r.code }).toEqual({ args, code: 2 });
      expect(r.err).toContain(needle);
      expect(r.err.trim().split("\n").length).toBe(1);
    }
  });

  test("a_restarted_node_restores_the_checkpoints_it_spilled_to_its_state_dir", async () => {
    const stateDir = join(dir, "state-restart");
    // No checkpoint RAM: every checkpoint goes to disk at once.
    const args = ["--checkpoint-ram", "0", "--checkpoint-disk", "64", "--cache-ram", "0"];
    const messages = [
      { role: "system", content: "You review pull requests for a storage engine. ".repeat(12) },
      { role: "user", content: "Review the first patch." },
    ];
    const chat = async (url: string, body: object, session?: string) => {
      const r = await fetch(`${url}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", ...(session ? { "x-session-id": session } : {}) },
        body: JSON.stringify({ model: "mesh-tiny", max_tokens: 4, temperature: 0, ...body }),
      });
      expect(r.status).toBe(200);
      return (await r.json()) as {
        choices: Array<{ message: { content: string } }>;
        usage: { prompt_tokens_details: { cached_tokens: number } };
      };
    };
    const first = await spawnNode({ name: "one", dir, model: "mesh-tiny", args, stateDir });
    const t1 = await chat(first.url, { messages }, "review");
    first.proc.kill("SIGTERM");
    await first.proc.exited;
    const spilled = join(stateDir, "checkpoints");
    expect(existsSync(spilled)).toBe(true);
    expect(readdirSync(spilled).flatMap((d) => readdirSync(join(spilled, d))).length).toBe(1);

    const again = await spawnNode({ name: "two", dir, model: "mesh-tiny", args, stateDir });
    try {
      // The session is gone with the old process; the conversation's next turn finds its checkpoint by its tokens.
      const next = [
        ...messages,
        { role: "assistant", content: t1.choices[0]?.message.content },
        { role: "user", content: "And the second." },
      ];
      const t2 = await chat(again.url, { messages: next }, "review");
      expect(t2.usage.prompt_tokens_details.cached_tokens).toBeGreaterThan(100);
      const metrics = await (await fetch(`${again.url}/metrics`)).text();
      expect(metrics).toMatch(/^mesh_checkpoint_restores_total [1-9]/m);
    } finally {
      again.proc.kill("SIGKILL");
      await again.proc.exited;
    }
  }, 240_000);
});
