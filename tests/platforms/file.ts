// Running one built platform file as a user would: copied into an empty
// directory, an empty HOME, maybe through an emulator (qemu for arm64).
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import OpenAI from "openai";

/** The repository's dist/ directory, where build.ts puts the files. */
export const DIST = resolve(import.meta.dir, "..", "..", "dist");

/** A platform file under dist/, or a clear failure naming the command that builds it. */
export function builtFile(name: string, buildWith: string): string {
  const p = join(DIST, name);
  if (!existsSync(p)) throw new Error(`${p} is not built: run 'bun run build.ts compile ${buildWith}' (npm run test:platforms does)`);
  return p;
}

/** How to run a file: through which emulator, with which extra environment. */
export interface RunSpec {
  file: string;
  prefix?: string[];
  env?: Record<string, string>;
}

/** A running `mesh serve` of a platform file. */
export interface ServingFile {
  url: string;
  client: OpenAI;
  /** Everything it wrote to stderr so far. */
  log(): string;
  stop(): Promise<void>;
}

/** A fresh empty run directory and HOME for one file, removed by cleanup(). */
export function sandbox(spec: RunSpec): { cmd: string[]; cwd: string; env: Record<string, string>; cleanup(): void } {
  const root = mkdtempSync(join(tmpdir(), "mesh-platform-"));
  const cwd = join(root, "run");
  const home = join(root, "home");
  mkdirSync(cwd);
  mkdirSync(home);
  const exe = join(cwd, "mesh");
  copyFileSync(spec.file, exe);
  return {
    cmd: [...(spec.prefix ?? []), exe],
    cwd,
    env: { PATH: "/usr/bin:/bin", HOME: home, ...spec.env },
    cleanup: () => rmSync(root, { recursive: true, force: true }),
  };
}

/** Run a file with arguments to completion; its exit code and output. */
export async function runFile(spec: RunSpec, args: string[]): Promise<{ code: number; out: string; err: string }> {
  const box = sandbox(spec);
  try {
    const p = Bun.spawn([...box.cmd, ...args], { cwd: box.cwd, env: box.env, stdout: "pipe", stderr: "pipe" });
    const [out, err, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
    return { code, out, err };
  } finally {
    box.cleanup();
  }
}

/** Start `mesh serve` on the demo model and wait until it says ready (or exits). */
export async function serveFile(spec: RunSpec, args: string[] = []): Promise<ServingFile> {
  const box = sandbox(spec);
  const proc = Bun.spawn([...box.cmd, "serve", "--port", "0", "--ctx-size", "2048", "--parallel", "2", ...args], {
    cwd: box.cwd,
    env: box.env,
    stdout: "ignore",
    stderr: "pipe",
  });
  let log = "";
  const reader = proc.stderr.getReader();
  const pump = (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      log += new TextDecoder().decode(value);
    }
  })();
  while (!log.includes("ready: POST")) {
    if (proc.exitCode !== null || proc.signalCode !== null) {
      box.cleanup();
      throw new Error(`mesh serve exited before it was ready:\n${log}`);
    }
    await Bun.sleep(100);
  }
  const url = /listening on (http:\/\/[^\s]+)/.exec(log)?.[1] as string;
  return {
    url,
    client: new OpenAI({ baseURL: `${url}/v1`, apiKey: "x", maxRetries: 0, timeout: 600_000 }),
    log: () => log,
    stop: async () => {
      proc.kill("SIGTERM");
      await proc.exited;
      await pump.catch(() => undefined);
      box.cleanup();
    },
  };
}

/** The qemu user-mode emulator and arm64 C library for running linux-arm64 files on x64, or null when absent. */
export function qemuArm64(): string[] | null {
  if (process.arch === "arm64") return [];
  const qemu = ["/usr/bin/qemu-aarch64-static", "/usr/bin/qemu-aarch64"].find((p) => existsSync(p));
  if (!qemu || !existsSync("/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1")) return null;
  return [qemu, "-L", "/usr/aarch64-linux-gnu"];
}
