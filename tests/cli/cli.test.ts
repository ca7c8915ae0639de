import { describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import OpenAI from "openai";
import { tinyModel } from "../helpers/model";

const MAIN = join(import.meta.dir, "..", "..", "src", "cli", "main.ts");
// Nodes started here keep their key and mesh credentials in a scratch dir, not the user's
// (whose own node may be running: a state dir serves one node at a time).
const ENV = { ...process.env, MESH_STATE_DIR: mkdtempSync(join(tmpdir(), "mesh-cli-state-")) };

function mesh(args: string[]) {
  // A bad value that is wrongly accepted starts a server that never exits: fail the case instead of hanging the suite.
  const r = Bun.spawnSync([process.execPath, MAIN, ...args], { stdout: "pipe", stderr: "pipe", env: ENV, timeout: 60_000 });
  return { code: r.exitCode, out: r.stdout.toString(), err: r.stderr.toString() };
}

describe("mesh command line", () => {
  test("help_lists_commands_and_examples", () => {
    const r = mesh(["--help"]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("serve");
    expect(r.out).toContain("Examples:");
    const s = mesh(["serve", "--help"]);
    expect(s.code).toBe(0);
    for (const flag of [
      "--model",
      "--alias",
      "--host",
      "--port",
      "--ctx-size",
      "--parallel",
      "--threads",
      "--n-gpu-layers",
      "--queue-capacity",
      "--queue-timeout",
      "--kv-reserve-output",
      "--cache-ram",
      "--idle-restore",
      "--api-key",
      "--log-format",
    ]) {
      expect(s.out).toContain(flag);
    }
  });

  test("version_prints_the_package_version_the_llama_cpp_commit_and_the_backend", () => {
    const r = mesh(["--version"]);
    expect(r.code).toBe(0);
    const pin = JSON.parse(readFileSync(join(import.meta.dir, "..", "..", "vendor", "llama.cpp", "pin.json"), "utf8"));
    const lines = r.out.trim().split("\n");
    expect(lines[0]).toMatch(/^mesh \d+\.\d+\.\d+$/);
    expect(r.out).toContain(`commit ${pin.commit.slice(0, 12)}`);
    expect(r.out).toMatch(/^backend /m);
    const j = mesh(["version", "--json"]);
    expect(j.code).toBe(0);
    const info = JSON.parse(j.out);
    expect(info.llamaCpp.commit).toBe(pin.commit);
    expect(info.version).toBe(lines[0]?.slice("mesh ".length));
  });

  test("bad_input_is_one_line_on_stderr_and_exit_code_2", () => {
    const dir = mkdtempSync(join(tmpdir(), "mesh-cli-"));
    const notGguf = join(dir, "x.gguf");
    writeFileSync(notGguf, "hello");
    writeFileSync(join(dir, "empty-keys"), "# no keys here\n\n");
    const cases: Array<[string[], string]> = [
      [["serve", "--bogus"], "unknown option"],
      [["serve", "--port", "abc"], "--port"],
      [["serve", "--port", "70000"], "--port"],
      [["serve", "--parallel", "0"], "--parallel"],
      [["serve", "--ctx-size", "2000000000"], "--ctx-size"],
      [["serve", "--cache-ram", "-1"], "--cache-ram"],
      [["serve", "--cache-ram", "abc"], "--cache-ram"],
      [["serve", "--idle-restore", "maybe"], "--idle-restore"],
      [["serve", "--idle-restore"], "--idle-restore"],
      [["serve", "--queue-timeout", "0"], "--queue-timeout"],
      [["serve", "--queue-timeout", "abc"], "--queue-timeout"],
      [["serve", "--queue-timeout"], "--queue-timeout"],
      [["serve", "--queue-capacity", "-1"], "--queue-capacity"],
      [["serve", "--queue-capacity", "1.5"], "--queue-capacity"],
      [["serve", "--kv-reserve-output", "0"], "--kv-reserve-output"],
      [["serve", "--kv-reserve-output", "abc"], "--kv-reserve-output"],
      [["serve", "--log-format", "xml"], "log-format"],
      [["serve", "--model", join(dir, "missing.gguf")], "not found"],
      [["serve", "--model", notGguf], "not a GGUF"],
      [["frobnicate"], "unknown command"],
      [["serve", "--api-key", ""], "must not be empty"],
      [["serve", "--api-key-file", join(dir, "empty-keys")], "holds no keys"],
      [["serve", "--console", "everyone"], "--console"],
      [["serve", "--console"], "--console"],
    ];
    for (const [args, needle] of cases) {
      const r = mesh(args);
      expect(r.code).toBe(2);
      expect(r.err).toContain(needle);
      expect(r.err.trim().split("\n").length).toBe(1);
      expect(r.err).not.toContain("    at ");
    }
  });
});

describe("mesh serve --alias", () => {
  test("bad_aliases_are_one_line_on_stderr_and_exit_code_2", async () => {
    const model = await tinyModel(); // served as mesh-tiny
    const many = Array.from({ length: 16 }, (_, i) => ["--alias", `a${i}`]).flat();
    const cases: Array<[string[], string]> = [
      [["--alias", ""], "must not be empty"],
      [["--alias", "  "], "must not be empty"],
      [["--alias", "x".repeat(300)], "the limit is 256"],
      [["--alias", "gpt-4o", "--alias", "gpt-4o"], "'gpt-4o' is given twice"],
      [["--alias", "mesh-tiny"], "'mesh-tiny' is the id of a served model"],
      [many, "at most 15 aliases"],
    ];
    for (const [args, needle] of cases) {
      const r = mesh(["serve", "--model", model, "--port", "0", ...args]);
      expect({ args: args.slice(0, 4), code: r.code }).toEqual({ args: args.slice(0, 4), code: 2 });
      expect(r.err).toContain(needle);
      expect(r.err.trim().split("\n").length).toBe(1);
    }
  });
});

async function readUntil(stream: ReadableStream<Uint8Array>, needle: string, sink: { text: string }): Promise<void> {
  const reader = stream.getReader();
  const dec = new TextDecoder();
  while (!sink.text.includes(needle)) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`stream ended before '${needle}': ${sink.text}`);
    sink.text += dec.decode(value);
  }
  reader.releaseLock();
}

describe("mesh serve as a process", () => {
  test("serves_then_finishes_in_flight_requests_and_exits_0_on_sigterm", async () => {
    const model = await tinyModel();
    const proc = Bun.spawn(
      [
        process.execPath,
        MAIN,
        "serve",
        "--model",
        model,
        "--port",
        "0",
        "--ctx-size",
        "2048",
        "--parallel",
        "2",
        "--shutdown-grace",
        "600",
      ],
      {
        stdout: "pipe",
        stderr: "pipe",
        env: ENV,
      },
    );
    const log = { text: "" };
    try {
      await readUntil(proc.stderr, "ready: POST", log);
      const url = /listening on (http:\/\/[^\s]+)/.exec(log.text)?.[1] as string;
      const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: "x", maxRetries: 0 });
      // A first request leaves an idle keep-alive connection open: shutdown must not wait on it.
      await client.chat.completions.create({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 2 });
      const stream = await client.chat.completions.create({
        model: "mesh-tiny",
        messages: [{ role: "user", content: "a long answer" }],
        max_tokens: 120,
        ignore_eos: true,
        stream: true,
      } as OpenAI.ChatCompletionCreateParamsStreaming);
      let finish: string | null = null;
      let n = 0;
      for await (const c of stream) {
        if (n++ === 2) proc.kill("SIGTERM");
        finish = c.choices[0]?.finish_reason ?? finish;
      }
      // The in-flight stream ran to its end during the grace period.
      expect(finish).toBe("length");
      expect(await proc.exited).toBe(0);
      await readUntil(proc.stderr, "stopped", log);
      expect(log.text).toContain("shutting down");
    } finally {
      proc.kill("SIGKILL");
    }
  });

  test("port_in_use_is_exit_code_2", async () => {
    const blocker = Bun.serve({ port: 0, hostname: "127.0.0.1", fetch: () => new Response("x") });
    try {
      const r = mesh(["serve", "--model", await tinyModel(), "--port", String(blocker.port)]);
      expect(r.code).toBe(2);
      expect(r.err).toContain("already in use");
    } finally {
      blocker.stop(true);
    }
  });
});
