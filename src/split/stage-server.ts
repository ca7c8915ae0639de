// A node's stage server: ggml's RPC server over this node's device, on a
// loopback port only the stage tunnel (tunnel.ts) connects to.
//
// It runs in a Worker thread of this process rather than a child process:
// ggml's server loop never returns and cannot be stopped, and a Worker dies
// with the node (a kill -9 leaves no orphaned server holding memory or a
// port), needs no second copy of the executable's extracted library, and
// reuses the engine Worker's entry (bundled in the executable already). What
// it gives up is crash isolation: a fault in ggml's server ends this node.
import { mkdirSync } from "node:fs";
import { connect, createServer } from "node:net";
import { engineWorkerUrl, findNativeLib } from "../engine/library";
import type { FromWorker, ToWorker } from "../engine/protocol";

/** Why a stage server could not start, as a value. */
export interface StageServerError {
  code: "stage_server_failed";
  message: string;
}

/** A running stage server. */
export interface StageServer {
  /** Loopback port of ggml's RPC server. */
  readonly port: number;
}

// A free loopback port: bind port 0, read it, release it (ggml binds it next).
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const addr = s.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      s.close(() => resolve(port));
    });
  });
}

// Wait until something accepts on 127.0.0.1:port (ggml's server is up), up to timeoutMs.
async function waitListening(port: number, timeoutMs: number): Promise<boolean> {
  const until = performance.now() + timeoutMs;
  while (performance.now() < until) {
    const up = await new Promise<boolean>((resolve) => {
      const s = connect({ host: "127.0.0.1", port });
      s.once("connect", () => {
        s.destroy();
        resolve(true);
      });
      s.once("error", () => resolve(false));
    });
    if (up) return true;
    await Bun.sleep(50);
  }
  return false;
}

/** Start ggml's RPC server in its own Worker on a free loopback port; tensors it receives are cached under cacheDir. */
export async function startStageServer(opts: {
  cacheDir: string | null;
  threads: number;
  libPath?: string;
  logLevel?: number;
}): Promise<StageServer | StageServerError> {
  const libPath = opts.libPath ?? findNativeLib();
  if (!libPath)
    return { code: "stage_server_failed", message: "the native llama.cpp library is not built: run 'bun run build.ts native' first" };
  if (opts.cacheDir) mkdirSync(opts.cacheDir, { recursive: true });
  const port = await freePort();
  const worker = new Worker(engineWorkerUrl());
  // The Worker blocks in native code for good: it must not keep the process alive on its own.
  worker.unref();
  const failed = new Promise<string>((resolve) => {
    worker.onmessage = (e: MessageEvent<FromWorker>) => {
      if (e.data.type === "stage_failed") resolve(e.data.message);
    };
    worker.onerror = (e) => resolve(`stage server worker failed: ${e.message}`);
  });
  const msg: ToWorker = {
    type: "stage_serve",
    libPath,
    endpoint: `127.0.0.1:${port}`,
    cacheDir: opts.cacheDir,
    threads: opts.threads,
    logLevel: opts.logLevel ?? 4,
  };
  worker.postMessage(msg);
  const up = await Promise.race([waitListening(port, 30_000), failed]);
  if (up === true) return { port };
  return {
    code: "stage_server_failed",
    message: typeof up === "string" ? up : `the stage server did not start listening on 127.0.0.1:${port}`,
  };
}
