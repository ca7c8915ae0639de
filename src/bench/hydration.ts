// Checkpoint hydration: how long a rejoining node's background pass takes to
// pull its share of a peer's session checkpoints, one at a time
// (--hydrate-parallel 1) against the lanes' parallelism. Real `mesh serve`
// processes on loopback: node b serves N sessions alone (one turn each, a
// distinct long system prompt, so each holds a checkpoint); node a then joins
// again and again with each parallelism in turn (interleaved, same identity,
// so the same share of sessions is homed at it; checkpoints kept in RAM only,
// so every run starts empty) and reports its pass's own duration from its log.
// With --rtt-ms, b is reached only through a TCP proxy that delays every chunk
// by half that in each direction (b advertises the proxy's address), standing
// in for a network with that round-trip time.
//
//   bun run src/bench/hydration.ts [--model bench|tiny|PATH] [--sessions 16] [--prompt-words 300] [--parallel 1,4] [--rounds 2] [--threads N] [--rtt-ms 0]
import { execSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { connect, createServer, type Server } from "node:net";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { BENCH, TINY } from "../gguf/generate";
import { ensureModel } from "../gguf/models";

const MAIN = join(import.meta.dir, "..", "cli", "main.ts");

const uptimeLoad = () =>
  execSync("uptime")
    .toString()
    .trim()
    .replace(/.*load average: /, "");

interface Node {
  url: string;
  proc: ReturnType<typeof Bun.spawn>;
  log(): string;
}

/** Start `mesh serve` and wait until it is ready (its stderr kept for the log lines the bench reads). */
async function spawn(model: string, stateDir: string, name: string, threads: number, args: string[]): Promise<Node> {
  const proc = Bun.spawn(
    [
      process.execPath,
      MAIN,
      "serve",
      "--model",
      model,
      "--ctx-size",
      "8192",
      "--parallel",
      "2",
      "--threads",
      String(threads),
      "--state-dir",
      stateDir,
      "--node-name",
      name,
      "--cache-ram",
      "0",
      "--checkpoint-disk",
      "0",
      "--log-format",
      "json",
      ...(args.includes("--port") ? [] : ["--port", "0"]),
      ...args,
    ],
    { stdout: "ignore", stderr: "pipe" },
  );
  let log = "";
  void (async () => {
    const dec = new TextDecoder();
    for await (const chunk of proc.stderr as ReadableStream<Uint8Array>) log += dec.decode(chunk);
  })();
  const deadline = Date.now() + 300_000;
  while (!log.includes("ready: POST")) {
    if (proc.exitCode !== null || Date.now() > deadline) {
      proc.kill("SIGKILL");
      throw new Error(`node ${name} did not start:\n${log.slice(-4000)}`);
    }
    await Bun.sleep(50);
  }
  const url = /listening on (http:\/\/\S+)/.exec(log)?.[1] as string;
  return { url, proc, log: () => log };
}

/** A free TCP port on 127.0.0.1 (bound and released). */
async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/** A TCP proxy on `listen` to `target` that delays each chunk by `delayMs` in each direction (order kept: equal delays fire in order). */
async function delayingProxy(listen: number, target: number, delayMs: number): Promise<Server> {
  const srv = createServer((client) => {
    const up = connect(target, "127.0.0.1");
    const pass = (from: typeof client, to: typeof client) => {
      from.on("data", (d) => setTimeout(() => to.write(d), delayMs));
      from.on("end", () => setTimeout(() => to.end(), delayMs));
      from.on("error", () => to.destroy());
    };
    pass(client, up);
    pass(up, client);
  });
  await new Promise<void>((r) => srv.listen(listen, "127.0.0.1", r));
  return srv;
}

/** The hydration pass line a node logged (JSON logs), once it has one that hydrated something. */
function passOf(n: Node): { hydrated: number; failed: number; ms: number } | null {
  for (const line of n.log().split("\n")) {
    if (!line.includes("checkpoint hydration pass")) continue;
    try {
      const v = JSON.parse(line) as { hydrated?: number; failed?: number; ms?: number };
      if ((v.hydrated ?? 0) > 0 && typeof v.ms === "number") return { hydrated: v.hydrated ?? 0, failed: v.failed ?? 0, ms: v.ms };
    } catch {}
  }
  return null;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      model: { type: "string", default: "bench" },
      sessions: { type: "string", default: "16" },
      "prompt-words": { type: "string", default: "300" },
      parallel: { type: "string", default: "1,4" },
      rounds: { type: "string", default: "2" },
      threads: { type: "string" },
      "rtt-ms": { type: "string", default: "0" },
    },
  });
  const model = values.model === "bench" ? await ensureModel(BENCH) : values.model === "tiny" ? await ensureModel(TINY) : values.model;
  const sessions = Number(values.sessions);
  const words = Number(values["prompt-words"]);
  const levels = (values.parallel ?? "1,4").split(",").map(Number);
  const rounds = Number(values.rounds);
  const threads = Number(values.threads ?? Math.max(1, Math.floor(cpus().length / 2)));
  const dir = mkdtempSync(join(tmpdir(), "mesh-bench-hydration-"));
  const nodes: Node[] = [];
  const rtt = Number(values["rtt-ms"]);
  let proxy: Server | null = null;
  try {
    let bArgs: string[] = [];
    if (rtt > 0) {
      const [port, front] = [await freePort(), await freePort()];
      proxy = await delayingProxy(front, port, rtt / 2);
      bArgs = ["--port", String(port), "--advertise", `127.0.0.1:${front}`];
    }
    const b = await spawn(model, join(dir, "b"), "b", threads, bArgs);
    nodes.push(b);
    const token = /mesh serve --join (\S+)/.exec(b.log())?.[1] as string;
    const models = (await (await fetch(`${b.url}/v1/models`)).json()) as { data: Array<{ id: string }> };
    const id = models.data[0]?.id as string;
    for (let i = 0; i < sessions; i++) {
      const system = `Session ${i}. ${"Plan the build, run the tests, report each step. ".repeat(Math.ceil(words / 8))}`;
      const r = await fetch(`${b.url}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", "x-session-id": `bench-${i}` },
        body: JSON.stringify({
          model: id,
          messages: [
            { role: "system", content: system },
            { role: "user", content: "go" },
          ],
          max_tokens: 1,
        }),
      });
      if (r.status !== 200) throw new Error(`session turn failed: ${r.status} ${await r.text()}`);
      await r.arrayBuffer();
    }
    console.log(
      `model ${model}, ${sessions} sessions on b, threads ${threads}, round trip to b ${rtt > 0 ? `${rtt} ms (delaying proxy)` : "loopback"}`,
    );
    console.log("| parallel | round | checkpoints hydrated | pass ms | ms per checkpoint | load (1/5/15 min) |");
    console.log("| ---: | ---: | ---: | ---: | ---: | --- |");
    for (let round = 1; round <= rounds; round++) {
      for (const p of levels) {
        const load = uptimeLoad();
        const a = await spawn(model, join(dir, "a"), "a", threads, ["--join", token, "--hydrate-parallel", String(p)]);
        nodes.push(a);
        const deadline = Date.now() + 300_000;
        let pass = passOf(a);
        while (!pass && Date.now() < deadline) {
          await Bun.sleep(100);
          pass = passOf(a);
        }
        a.proc.kill("SIGKILL");
        await a.proc.exited;
        if (!pass) throw new Error(`no hydration pass on a:\n${a.log().slice(-4000)}`);
        const per = (pass.ms / pass.hydrated).toFixed(1);
        console.log(
          `| ${p} | ${round} | ${pass.hydrated}${pass.failed ? ` (${pass.failed} failed)` : ""} | ${pass.ms} | ${per} | ${load} |`,
        );
      }
    }
    const bytes = await (await fetch(`${b.url}/metrics`)).text();
    const ram = /^mesh_checkpoint_ram_bytes (\d+)/m.exec(bytes)?.[1];
    if (ram) console.log(`b holds ${sessions} checkpoints in ${(Number(ram) / 1048576).toFixed(1)} MiB of RAM`);
  } finally {
    proxy?.close();
    for (const n of nodes) n.proc.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
