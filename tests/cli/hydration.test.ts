// `mesh serve`'s hydration flags, run as a user runs them: bad values are one line and exit 2, and
// --help says what they do.
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { MAIN } from "../helpers/cluster";

const dir = mkdtempSync(join(tmpdir(), "mesh-cli-hydration-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function mesh(args: string[]) {
  const env = { ...process.env, MESH_STATE_DIR: join(dir, "state") };
  const r = Bun.spawnSync([process.execPath, MAIN, ...args], { stdout: "pipe", stderr: "pipe", env, timeout: 60_000 });
  return { code: r.exitCode, out: r.stdout.toString(), err: r.stderr.toString() };
}

describe("mesh serve hydration flags", () => {
  test("bad_hydration_flags_are_one_line_on_stderr_and_exit_code_2", () => {
    const cases: Array<[string[], string]> = [
      [["serve", "--hydrate-parallel", "-1"], "--hydrate-parallel"],
      [["serve", "--hydrate-parallel", "65"], "--hydrate-parallel"],
      [["serve", "--hydrate-timeout", "0"], "--hydrate-timeout"],
      [["serve", "--hydrate-timeout", "soon"], "--hydrate-timeout"],
    ];
    for (const [args, needle] of cases) {
      const r = mesh(args);
      expect({ args, code: r.code }).toEqual({ args, code: 2 });
      expect(r.err).toContain(needle);
      expect(r.err.trim().split("\n").length).toBe(1);
    }
  });

  test("serve_help_explains_the_hydration_flags", () => {
    const r = mesh(["serve", "--help"]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("--hydrate-parallel <n>");
    expect(r.out).toContain("--hydrate-timeout <s>");
  });
});
