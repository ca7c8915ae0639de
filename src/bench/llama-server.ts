// A server child process for benchmarks (llama-server, or a mesh node):
// started on a free loopback port, ready once /health answers 200, and always
// killed when this process ends (normal exit, thrown error, SIGINT/SIGTERM/SIGHUP).
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { nativeBuildDir } from "../engine/library";

/** How to start the server. */
export interface LlamaServerOptions {
  /** Path of the executable (llama-server, or bun / the mesh executable). */
  binary: string;
  /** Name in error messages. Default "llama-server". */
  name?: string;
  /** Arguments besides --host/--port (model, threads, context...). */
  args: string[];
  /** Give up when /health is not ready after this long (model load included). */
  startupTimeoutMs?: number;
  /** Extra environment for the child (on top of this process's). */
  env?: Record<string, string>;
}

/** Where `bun run build.ts native --with-llama-server` puts llama-server. */
export function defaultLlamaServerPath(): string {
  return join(nativeBuildDir("cpu"), "bin", process.platform === "win32" ? "llama-server.exe" : "llama-server");
}

/** A free TCP port on 127.0.0.1 (asked from the OS, then released for the child to bind). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      srv.close(() => (port > 0 ? resolve(port) : reject(new Error("could not get a free port"))));
    });
  });
}

/** The option names llama-server's --help lists (so optional flags are passed only when this build knows them). */
export function llamaServerFlags(binary: string): Set<string> {
  const r = spawnSync(binary, ["--help"], { encoding: "utf8", timeout: 30_000 });
  const text = `${r.stdout ?? ""}\n${r.stderr ?? ""}`;
  return new Set(text.match(/--?[a-zA-Z][\w-]*/g) ?? []);
}

// Children still alive (with their log directory), killed synchronously if
// this process goes away first.
const live = new Map<ChildProcess, string>();
const signals: NodeJS.Signals[] = ["SIGINT", "SIGTERM", "SIGHUP"];
const SIGNAL_EXIT: Record<string, number> = { SIGHUP: 129, SIGINT: 130, SIGTERM: 143 };

function killAllNow(): void {
  for (const [c, logDir] of live) {
    try {
      c.kill("SIGKILL");
    } catch {
      // Already gone.
    }
    rmSync(logDir, { recursive: true, force: true });
  }
  live.clear();
}

function onSignal(sig: NodeJS.Signals): void {
  killAllNow();
  process.exit(SIGNAL_EXIT[sig] ?? 1);
}

// Handlers exist only while a child does, so importing this module changes no
// signal behaviour of the host process.
function track(c: ChildProcess, logDir: string): void {
  if (live.size === 0) {
    process.on("exit", killAllNow);
    for (const s of signals) process.on(s, onSignal);
  }
  live.set(c, logDir);
}

function untrack(c: ChildProcess): void {
  if (!live.delete(c) || live.size > 0) return;
  process.off("exit", killAllNow);
  for (const s of signals) process.off(s, onSignal);
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** A running server process; call stop() when done (it is also killed when this process exits). */
export class LlamaServer {
  private exited: Promise<void>;
  private hasExited = false;
  private spawnError: Error | null = null;

  private constructor(
    private readonly child: ChildProcess,
    /** Base URL, e.g. http://127.0.0.1:41234 */
    readonly url: string,
    /** File receiving the server's stdout and stderr. */
    readonly logFile: string,
    private readonly logDir: string,
    private readonly name: string,
  ) {
    this.exited = new Promise((resolve) => {
      const gone = () => {
        this.hasExited = true;
        untrack(child);
        resolve();
      };
      child.once("exit", gone);
      // A child that could not be started emits "error" and maybe never "exit".
      child.once("error", (e) => {
        this.spawnError = e;
        gone();
      });
    });
  }

  /** Process id of the server. */
  get pid(): number | undefined {
    return this.child.pid;
  }

  /** Start the server on a free loopback port (it must take --host and --port) and wait until /health says it is ready. */
  static async start(opts: LlamaServerOptions): Promise<LlamaServer> {
    if (!existsSync(opts.binary)) throw new Error(`${opts.name ?? "llama-server"} not found at ${opts.binary}`);
    // Another process may take the port between freePort() and the child's bind: retry on a fresh one.
    let lastError: Error | null = null;
    for (let attempt = 0; attempt < 3; attempt++) {
      const server = LlamaServer.spawn(opts, await freePort());
      try {
        await server.waitReady(opts.startupTimeoutMs ?? 120_000);
        return server;
      } catch (e) {
        lastError = e as Error;
        const bindFailed = /bind|already in use/i.test(server.logTail());
        await server.stop();
        if (!bindFailed) break;
      }
    }
    throw lastError ?? new Error(`${opts.name ?? "llama-server"} did not start`);
  }

  private static spawn(opts: LlamaServerOptions, port: number): LlamaServer {
    const logDir = mkdtempSync(join(tmpdir(), "mesh-llama-server-"));
    const logFile = join(logDir, "server.log");
    // Output goes to a file, not a pipe: nothing in this process has to drain it while measuring.
    const fd = openSync(logFile, "w");
    try {
      const child = spawn(opts.binary, [...opts.args, "--host", "127.0.0.1", "--port", String(port)], {
        stdio: ["ignore", fd, fd],
        ...(opts.env ? { env: { ...process.env, ...opts.env } } : {}),
      });
      track(child, logDir);
      return new LlamaServer(child, `http://127.0.0.1:${port}`, logFile, logDir, opts.name ?? "llama-server");
    } finally {
      closeSync(fd);
    }
  }

  private async waitReady(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (this.spawnError) throw new Error(`${this.name} could not be started: ${this.spawnError.message}`);
      if (this.hasExited) throw new Error(`${this.name} exited during startup:\n${this.logTail()}`);
      try {
        const res = await fetch(`${this.url}/health`, { signal: AbortSignal.timeout(2000), keepalive: false });
        await res.arrayBuffer();
        // 503 while the model loads, 200 once slots accept work.
        if (res.ok) return;
      } catch {
        // Not listening yet.
      }
      await sleep(200);
    }
    throw new Error(`${this.name} was not ready after ${Math.round(timeoutMs / 1000)} s:\n${this.logTail()}`);
  }

  /** Last lines of the server's log (for error messages). */
  logTail(lines = 20): string {
    try {
      return readFileSync(this.logFile, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
    } catch {
      return "(no log)";
    }
  }

  /** Stop the server: SIGTERM, then SIGKILL if it has not exited within graceMs. Removes its log. */
  async stop(graceMs = 5000): Promise<void> {
    if (!this.hasExited) {
      this.child.kill("SIGTERM");
      const timer = setTimeout(() => this.child.kill("SIGKILL"), graceMs);
      await this.exited;
      clearTimeout(timer);
    }
    rmSync(this.logDir, { recursive: true, force: true });
  }
}
