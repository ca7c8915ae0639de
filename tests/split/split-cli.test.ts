import { expect, test } from "bun:test";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { meshCli } from "../helpers/cluster";

test("refuses_a_malformed_split_or_stage_flag_with_one_line_and_exit_2", () => {
  const state = mkdtempSync(join(tmpdir(), "mesh-split-cli-"));
  for (const [args, names] of [
    [["--split", "1"], "--split"],
    [["--split", "a,a"], "--split"],
    [["--split-max-rtt", "0"], "--split-max-rtt"],
    [["--stage-memory", "lots"], "--stage-memory"],
    [["--stage-port", "70000"], "--stage-port"],
    [["--stage-cache", "-1"], "--stage-cache"],
  ] as const) {
    const r = meshCli(["serve", "--state-dir", state, "--port", "0", ...args]);
    expect(r.code).toBe(2);
    expect(r.err.trim().split("\n")).toHaveLength(1);
    expect(r.err).toContain(names);
  }
});
