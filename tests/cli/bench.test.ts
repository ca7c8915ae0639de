import { describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const MAIN = join(import.meta.dir, "..", "..", "src", "cli", "main.ts");

function mesh(args: string[]) {
  const r = Bun.spawnSync([process.execPath, MAIN, ...args], { stdout: "pipe", stderr: "pipe" });
  return { code: r.exitCode, out: r.stdout.toString(), err: r.stderr.toString() };
}

describe("mesh bench command line", () => {
  test("bench_help_lists_both_benchmarks_with_examples", () => {
    const r = mesh(["bench", "--help"]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("kv-pressure");
    expect(r.out).toContain("engine");
    expect(r.out).toContain("Examples:");
    expect(mesh(["--help"]).out).toContain("bench");
  });

  test("kv_pressure_help_teaches_its_flags", () => {
    const r = mesh(["bench", "kv-pressure", "--help"]);
    expect(r.code).toBe(0);
    for (const flag of [
      "--url",
      "--compare",
      "--ctx-size",
      "--parallel",
      "--loops",
      "--turns",
      "--system-tokens",
      "--tool-result-tokens",
      "--max-tokens",
      "--seed",
      "--out",
      "--json",
      "--tiny",
    ]) {
      expect(r.out).toContain(flag);
    }
    expect(r.out).toContain("mesh bench kv-pressure --compare llama-server");
    const e = mesh(["bench", "engine", "--help"]);
    expect(e.code).toBe(0);
    for (const flag of ["--repeats", "--no-compare", "--json"]) expect(e.out).toContain(flag);
  });

  test("bad_flags_are_one_line_on_stderr_and_exit_code_2", () => {
    const out = mkdtempSync(join(tmpdir(), "mesh-bench-cli-"));
    const never = join(out, "never");
    try {
      const cases: Array<[string[], string]> = [
        [["bench", "kv-pressure", "--bogus"], "unknown option"],
        [["bench", "kv-pressure", "--loops", "0", "--out", never], "--loops"],
        [["bench", "kv-pressure", "--loops", "many", "--out", never], "--loops"],
        [["bench", "kv-pressure", "--compare", "vllm", "--out", never], "--compare"],
        [["bench", "kv-pressure", "--url", "localhost", "--out", never], "--url"],
        [["bench", "kv-pressure", "--url", "http://127.0.0.1:9", "--compare", "llama-server", "--out", never], "--url"],
        [["bench", "kv-pressure", "--ctx-size", "128", "--out", never], "--ctx-size"],
        [["bench", "kv-pressure", "--model", join(out, "missing.gguf"), "--out", never], "model not found"],
        [["bench", "engine", "--bogus"], "unknown option"],
        [["bench", "engine", "--repeats", "0"], "--repeats"],
        [["bench", "engine", "--prompt-tokens", "9000"], "--prompt-tokens"],
        [["bench", "engine", "--model", "tiny", "--llama-server", "/nonexistent/llama-server"], "--with-llama-server"],
        [["bench", "soak", "--duration", "1", "--out", never], "--duration"],
        [["bench", "soak", "--nodes", "1", "--out", never], "--nodes"],
        [["bench", "soak", "--model", join(out, "missing.gguf"), "--out", never], "model not found"],
        [["bench", "frobnicate"], "unknown command"],
      ];
      for (const [args, needle] of cases) {
        const r = mesh(args);
        expect({ args, code: r.code }).toEqual({ args, code: 2 });
        expect(r.err.trim().split("\n")).toHaveLength(1);
        expect(r.err).toContain(needle);
        expect(r.out).toBe("");
      }
      // Nothing was written for a refused run.
      expect(existsSync(never)).toBe(false);
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });

  test("tiny_run_prints_the_table_and_writes_the_report", () => {
    const out = mkdtempSync(join(tmpdir(), "mesh-bench-cli-"));
    try {
      const r = mesh(["bench", "kv-pressure", "--tiny", "--threads", "1", "--loops", "2", "--turns", "1", "--out", out]);
      expect(r.code).toBe(0);
      expect(r.out).toContain("decode failures");
      expect(r.out).toContain(`report: ${out}`);
      expect(r.err).toContain("mesh: ready at");
      const json = JSON.parse(readFileSync(join(out, "summary.json"), "utf8"));
      expect(json.command).toBe(`mesh bench kv-pressure --tiny --threads 1 --loops 2 --turns 1 --out ${out}`);
      expect(json.targets[0].requests).toBe(4);
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });
});
