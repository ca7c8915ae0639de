import { expect, test } from "bun:test";
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import OpenAI from "openai";
import { compileExecutable, executableName } from "../../build";

test("compiled_executable_serves_the_demo_model_from_an_empty_directory", async () => {
  const work = mkdtempSync(join(tmpdir(), "mesh-exe-"));
  try {
    const built = compileExecutable({ variant: "cpu", portable: false, withLlamaServer: false, jobs: cpus().length }, join(work, "dist"));
    expect(built.endsWith(executableName("cpu"))).toBe(true);
    // Nothing but the file itself: no repo, no node_modules, a fresh HOME.
    const run = join(work, "run");
    const home = join(work, "home");
    mkdirSync(run);
    mkdirSync(home);
    const exe = join(run, "mesh");
    copyFileSync(built, exe);
    const env = { PATH: "/usr/bin:/bin", HOME: home };
    const proc = Bun.spawn([exe, "serve", "--port", "0", "--ctx-size", "1024", "--parallel", "1"], {
      cwd: run,
      env,
      stderr: "pipe",
      stdout: "pipe",
    });
    try {
      const reader = proc.stderr.getReader();
      let log = "";
      while (!log.includes("ready: POST")) {
        const { value, done } = await reader.read();
        if (done) throw new Error(`exited early: ${log}`);
        log += new TextDecoder().decode(value);
      }
      expect(log).toContain("RANDOM WEIGHTS");
      const url = /listening on (http:\/\/[^\s]+)/.exec(log)?.[1] as string;
      const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: "x", maxRetries: 0 });
      const r = await client.chat.completions.create({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 3 });
      expect(r.usage?.completion_tokens).toBe(3);
      proc.kill("SIGTERM");
      expect(await proc.exited).toBe(0);
      // The native library went to the user's cache dir, not the working directory.
      expect(await Bun.file(join(run, "libmeshllama.so")).exists()).toBe(false);
      expect(new Bun.Glob("**/libmeshllama.so").scanSync({ cwd: join(home, ".cache", "mesh", "native") }).next().value).toBeString();
    } finally {
      proc.kill("SIGKILL");
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
});
