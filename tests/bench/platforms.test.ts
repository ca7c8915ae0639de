// The platform-files benchmark: how each file is run, its arguments, and one
// real round against a node started from source (standing in for a file).
import { afterAll, expect, test } from "bun:test";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { formatPlatformReport, main, runPlatformBench, targetFor } from "../../src/bench/platforms";

const dir = mkdtempSync(join(tmpdir(), "mesh-bench-platforms-test-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

test("an_arm64_file_on_an_x64_host_runs_under_qemu_and_other_files_run_directly", () => {
  const elf = new Uint8Array(64);
  elf.set([0x7f, 0x45, 0x4c, 0x46]);
  elf[18] = 183; // EM_AARCH64
  const arm = join(dir, "mesh-linux-arm64");
  writeFileSync(arm, elf);
  const script = join(dir, "mesh-script");
  writeFileSync(script, "#!/bin/sh\n");
  expect(targetFor(script).command).toEqual([resolve(script)]);
  if (process.arch === "arm64" || !Bun.which("qemu-aarch64-static")) return;
  const t = targetFor(arm, { A: "1" });
  expect(t.command.slice(1)).toEqual(["-L", "/usr/aarch64-linux-gnu", resolve(arm)]);
  expect(t.label).toBe("mesh-linux-arm64 (qemu)");
  expect(t.env).toEqual({ A: "1" });
});

test("bad_arguments_are_one_line_and_exit_2", async () => {
  const writes: string[] = [];
  const orig = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((s: string) => writes.push(s) > 0) as typeof process.stderr.write;
  try {
    expect(await main([])).toBe(2);
    expect(await main(["--file", join(dir, "missing")])).toBe(2);
    expect(await main(["--file", "x", "--rounds", "0"])).toBe(2);
    expect(await main(["--file", "x", "--env", "nonsense"])).toBe(2);
  } finally {
    process.stderr.write = orig;
  }
  expect(writes.every((w) => w.startsWith("bench platforms: ") && w.trim().split("\n").length === 1)).toBe(true);
});

test("one_round_against_a_real_node_reports_a_decode_rate_and_where_the_layers_went", async () => {
  // A node from source stands in for a built file: same command line, same HTTP.
  const file = join(dir, "mesh-from-source");
  writeFileSync(file, `#!/bin/sh\nexec "${process.execPath}" "${resolve(import.meta.dir, "../../src/cli/main.ts")}" "$@"\n`);
  chmodSync(file, 0o755);
  const report = await runPlatformBench([targetFor(file)], { threads: 2, genTokens: 6, rounds: 1, onProgress: () => {} });
  const r = report.results[0];
  expect(r?.samples).toHaveLength(1);
  expect(r?.decodeTokS).toBeGreaterThan(0);
  expect(r?.placement).toContain("gpu_layers=0");
  expect(formatPlatformReport(report)).toContain("1.00x");
}, 120_000);
