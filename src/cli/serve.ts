// `mesh serve`: load a model, serve the OpenAI API, shut down gracefully.
import { closeSync, existsSync, openSync, readFileSync, readSync, statSync } from "node:fs";
import { cpus } from "node:os";
import { join } from "node:path";
import { type AttnKernel, describeAttention, type PlainAttn } from "../engine/attention";
import type { ModelInfo } from "../engine/protocol";
import { TINY } from "../gguf/generate";
import { ensureModel } from "../gguf/models";
import { GGUF_MAGIC } from "../gguf/types";
import { createLogger, type LogFormat, type Logger } from "../log";
import { ServedModel, startServer } from "../server";
import type { ConsoleMode } from "../server/console";
import { backendOf } from "../server/devices";
import { NodeHydration } from "../server/hydration";
import { checkAliases, modelIdFromPath } from "../server/model";
import { SplitEngine } from "../split/head";
import { parseSplitWant } from "../split/plan";
import { splitReportOf } from "../split/report";
import { offerStage, type StageNode } from "../split/stage-node";
import type { MeshFlags } from "./mesh-flags";
import { checkFileFlags, type FileFlags, isModelName, mountFiles, pulledFile, pullForServe } from "./serve-files";
import { prepareMesh, rememberedPeers, startMesh } from "./serve-mesh";
import { UsageError } from "./usage";

/** The line that says where the console is, or why it is not served. */
export function consoleLine(c: { mode: ConsoleMode; loopback: boolean }, keys: boolean, url: string): string {
  if (c.mode === "off") return "console: off (--no-console)";
  if (!keys && !c.loopback && c.mode !== "public") {
    return "console: not served (no --api-key and not listening on loopback; give --api-key, or --console public)";
  }
  return `console: ${url}/${keys ? " (asks for an API key)" : ""}`;
}

/** Options of `mesh serve`, as parsed by commander. */
export interface ServeOptions extends MeshFlags, FileFlags {
  model?: string;
  alias: string[];
  host: string;
  port: number;
  ctxSize: number;
  parallel: number;
  threads?: number;
  batchSize: number;
  /** --plain-attn: the window, or null for off; absent: the default for the kernel. */
  plainAttn?: PlainAttn | null;
  /** --attn-kernel. */
  attnKernel: AttnKernel;
  nGpuLayers: number;
  queueCapacity: number;
  queueTimeout: number;
  kvReserveOutput: number;
  cacheRam: number;
  /** --idle-restore. */
  idleRestore: boolean;
  sessionTtl: number;
  sessionsMax: number;
  sessionsMemory: number;
  checkpointRam: number;
  checkpointDisk: number;
  hydrateParallel: number;
  hydrateTimeout: number;
  apiKey: string[];
  apiKeyFile?: string;
  maxBodyBytes: number;
  responsesStore: number;
  shutdownGrace: number;
  logFormat: string;
  /** local, public, off; false from --no-console. */
  console?: string | false;
  /** --split: true (no value: auto) or its value. */
  split?: string | boolean;
  splitMaxRtt: number;
  splitWait: number;
  offerStage?: boolean;
  stageMemory?: number;
  stagePort: number;
  stageCache: number;
}

/** Whether `host` is a loopback address (the console's default guard serves only those without keys). */
export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || host === "[::1]" || /^127\.\d+\.\d+\.\d+$/.test(host);
}

function consoleMode(o: ServeOptions): ConsoleMode {
  const m = o.console === false ? "off" : (o.console ?? "local");
  if (m !== "local" && m !== "public" && m !== "off") throw new UsageError(`--console must be local, public or off, got '${m}'`);
  return m;
}

function checkGguf(path: string): void {
  if (!existsSync(path)) throw new UsageError(`model file not found: ${path}`);
  if (!statSync(path).isFile()) throw new UsageError(`model path is not a file: ${path}`);
  const fd = openSync(path, "r");
  try {
    const head = Buffer.alloc(4);
    const n = readSync(fd, head, 0, 4, 0);
    if (n < 4 || head.readUInt32LE(0) !== GGUF_MAGIC) throw new UsageError(`not a GGUF model file: ${path}`);
  } finally {
    closeSync(fd);
  }
}

function readKeys(o: ServeOptions): string[] {
  // An empty key (e.g. --api-key "$KEY" with KEY unset) or an empty key file must never mean "no auth".
  if (o.apiKey.some((k) => k.trim() === "")) throw new UsageError("--api-key must not be empty");
  const keys = [...o.apiKey];
  if (o.apiKeyFile) {
    if (!existsSync(o.apiKeyFile)) throw new UsageError(`API key file not found: ${o.apiKeyFile}`);
    for (const line of readFileSync(o.apiKeyFile, "utf8").split("\n")) {
      const k = line.trim();
      if (k && !k.startsWith("#")) keys.push(k);
    }
    if (keys.length === o.apiKey.length) throw new UsageError(`API key file ${o.apiKeyFile} holds no keys`);
  }
  return keys;
}

// A progress bar on a terminal, a line per quarter otherwise (logs stay readable).
function progressPrinter(label: string): (f: number) => void {
  const tty = process.stderr.isTTY === true;
  let lastQuarter = -1;
  return (f) => {
    const pct = Math.round(f * 100);
    if (tty) {
      const width = 30;
      const fill = Math.round(f * width);
      process.stderr.write(`\r${label} [${"#".repeat(fill)}${" ".repeat(width - fill)}] ${pct}%${f >= 1 ? "\n" : ""}`);
    } else {
      const q = Math.floor(f * 4);
      if (q !== lastQuarter) {
        lastQuarter = q;
        process.stderr.write(`${label}: ${pct}%\n`);
      }
    }
  };
}

const MiB = 1024 * 1024;

/** Log what the engine computes on: each GPU backend library (or why it did not load), each device, where the layers went. */
export function logDevices(logger: Logger, info: ModelInfo): void {
  for (const b of info.backends) {
    const name = backendName(b.library);
    if (b.error) logger.warn(`${name} backend not loaded: no ${name} device, serving on the CPU`, { library: b.library, error: b.error });
    else if (b.devices === 0) logger.warn(`no ${name} device found: serving on the CPU`, { library: b.library });
  }
  for (const d of info.devices) {
    logger.info("device", {
      name: d.name,
      description: d.description,
      backend: d.backend,
      type: d.type,
      free_mib: Math.round(d.freeBytes / MiB),
      total_mib: Math.round(d.totalBytes / MiB),
    });
  }
  logger.info("layers placed", { gpu_layers: info.offload.layers, of: info.offload.of, note: info.offload.note });
  logger.info("attention", describeAttention(info));
}

/** "CUDA" for libggml-cuda.so, "Vulkan" for libggml-vulkan.so. */
function backendName(library: string): string {
  const m = /libggml-([a-z0-9]+)/.exec(library)?.[1] ?? library;
  return m === "cuda" ? "CUDA" : m === "vulkan" ? "Vulkan" : m;
}

/** Run `mesh serve` until SIGINT/SIGTERM; resolves with the exit code. */
export async function serve(o: ServeOptions): Promise<number> {
  if (o.logFormat !== "text" && o.logFormat !== "json") throw new UsageError(`--log-format must be 'text' or 'json', got '${o.logFormat}'`);
  const logger = createLogger(o.logFormat as LogFormat);
  const apiKeys = readKeys(o);
  const consoleOptions = { mode: consoleMode(o), loopback: isLoopback(o.host) };
  const mesh = prepareMesh(o, { logger, apiKeyRequired: apiKeys.length > 0, maxBodyBytes: o.maxBodyBytes });
  checkFileFlags(o);
  let modelPath = o.model;
  let demo = false;
  // `--model <name>` with no such file: a model some member of the mesh announces, pulled into the state dir.
  let pullName: string | null = null;
  if (modelPath && !existsSync(modelPath) && isModelName(modelPath)) {
    const earlier = pulledFile(mesh.plan.stateDir, modelPath);
    if (earlier) modelPath = earlier;
    else if (mesh.plan.seeds.length === 0 && rememberedPeers(mesh.plan.stateDir).length === 0) {
      throw new UsageError(`model file not found: ${modelPath} (to pull a model by name from the mesh, join it: --join <token>)`);
    } else pullName = modelPath;
  }
  if (pullName !== null) {
    // Before the pull, which may take hours: what can be wrong with the aliases without the model's id.
    const aliasError = checkAliases(o.alias, []);
    if (aliasError) throw new UsageError(aliasError);
  }
  if (pullName === null) {
    if (modelPath) checkGguf(modelPath);
    else {
      demo = true;
      modelPath = await ensureModel(TINY);
    }
    const aliasError = checkAliases(o.alias, [modelIdFromPath(modelPath)]);
    if (aliasError) throw new UsageError(aliasError);
  }
  const threads = o.threads ?? Math.max(1, cpus().length);
  const want = o.split === undefined ? null : parseSplitWant(o.split === true ? "auto" : String(o.split));
  if (o.split !== undefined && !want) {
    throw new UsageError(`--split must be auto, a node count from 2 to 17, or a comma-separated list of peer ids, got '${o.split}'`);
  }
  // A split head plans from the stage offers the mesh gossips: it loads once the mesh is up.
  let meshUp: (ok: boolean) => void = () => {};
  const meshStarted = new Promise<boolean>((r) => {
    meshUp = r;
  });
  const startModel = (path: string, aliases: string[]) => {
    const engineOptions = {
      modelPath: path,
      nCtx: o.ctxSize,
      nParallel: o.parallel,
      nBatch: o.batchSize,
      nUbatch: Math.min(512, o.batchSize),
      threads,
      plainAttn: o.plainAttn,
      attnKernel: o.attnKernel,
      nGpuLayers: o.nGpuLayers,
      queueCapacity: o.queueCapacity,
      queueTimeoutMs: o.queueTimeout * 1000,
      defaultReserveOutput: o.kvReserveOutput,
      hostCacheMiB: o.cacheRam,
      idleRestore: o.idleRestore,
      checkpointRamMiB: o.checkpointRam,
      checkpointDiskMiB: o.checkpointDisk,
      // Spilled checkpoints live beside the node's identity, one directory per model fingerprint.
      checkpointDir: join(mesh.plan.stateDir, "checkpoints"),
      onProgress: progressPrinter(`loading ${path}`),
    };
    if (!want) return ServedModel.start({ ...engineOptions, aliases });
    const modelId = modelIdFromPath(path);
    return ServedModel.loading(
      modelId,
      path,
      meshStarted.then((up) => {
        if (!up) throw new Error("the server did not start");
        return SplitEngine.start({
          model: modelId,
          engine: engineOptions,
          want,
          headId: mesh.nodeId,
          secret: mesh.creds.secret,
          offers: () => mesh.node.stageOffers(),
          maxRttMs: o.splitMaxRtt,
          waitMs: o.splitWait * 1000,
          logger,
        });
      }),
      aliases,
    );
  };
  // The server reads this list per request: a model pulled from peers joins it once loaded.
  const models: ServedModel[] = [];
  if (modelPath && pullName === null) models.push(startModel(modelPath, o.alias));
  mesh.node.splitReports = () => {
    const r = models[0] ? splitReportOf(models[0].engine) : null;
    return r ? [r] : [];
  };
  const files = mountFiles(mesh, o, logger);
  // Reads `models` per pass: a model pulled from peers takes part once it is loaded.
  const hydration = new NodeHydration(
    mesh.node,
    models,
    { parallelism: o.hydrateParallel, itemTimeoutMs: o.hydrateTimeout * 1000 },
    logger,
  );
  let server: ReturnType<typeof startServer>;
  try {
    server = startServer({
      host: o.host,
      port: o.port,
      models,
      apiKeys,
      maxBodyBytes: o.maxBodyBytes,
      responseStoreBytes: o.responsesStore * 1024 * 1024,
      sessions: { ttlMs: o.sessionTtl * 1000, maxSessions: o.sessionsMax, maxTotalBytes: o.sessionsMemory * 1024 * 1024 },
      logger,
      mesh: mesh.node.hooks,
      console: consoleOptions,
      hydration,
    });
  } catch (e) {
    meshUp(false);
    for (const m of models) await m.close();
    const code = (e as { code?: string }).code;
    if (code === "EADDRINUSE") throw new UsageError(`port ${o.port} on ${o.host} is already in use (choose another with --port)`);
    throw new UsageError(`cannot listen on ${o.host}:${o.port}: ${(e as Error).message}`);
  }
  if (pullName !== null) {
    process.stderr.write(
      `mesh listening on ${server.url} — model '${pullName}' is pulled from the mesh; requests for it go to peers meanwhile\n`,
    );
    const addr = await startMesh(mesh, o.host, server.port, server.url, logger);
    const core = mesh.node.meshCore;
    if (core) files.attach(core);
    const stopping = new AbortController();
    const onSignal = () => stopping.abort();
    process.once("SIGINT", onSignal);
    process.once("SIGTERM", onSignal);
    try {
      const pulled = await pullForServe(files, pullName, {
        stateDir: mesh.plan.stateDir,
        waitS: o.pullWait ?? 120,
        logger,
        signal: stopping.signal,
      });
      modelPath = pulled.path;
      const id = modelIdFromPath(modelPath);
      const aliases = [...new Set([...o.alias, ...pulled.announce.aliases])].filter((a) => a !== id);
      const aliasError = checkAliases(aliases, [id]);
      if (aliasError) throw new UsageError(aliasError);
      models.push(startModel(modelPath, aliases));
    } catch (e) {
      await mesh.node.leave();
      await server.close();
      if (stopping.signal.aborted) {
        // Stopped by the operator: the verified chunks stay for the next start, which resumes from them.
        logger.info("stopped while pulling the model; the next start resumes the pull", { model: pullName });
        return 0;
      }
      throw e;
    } finally {
      process.off("SIGINT", onSignal);
      process.off("SIGTERM", onSignal);
    }
    return serveLoaded(o, {
      logger,
      mesh,
      server,
      model: models[0] as ServedModel,
      files,
      hydration,
      meshUp,
      addr,
      modelPath,
      threads,
      consoleOptions,
      apiKeys,
    });
  }
  const model = models[0] as ServedModel;
  const aka = model.aliases.length > 0 ? ` (also answers to ${model.aliases.map((a) => `'${a}'`).join(", ")})` : "";
  process.stderr.write(
    `mesh listening on ${server.url} — model '${model.id}'${aka}${demo ? " (built-in demo model: RANDOM WEIGHTS, its text is meaningless; pass --model to serve a real GGUF)" : ""}\n`,
  );

  const addr = await startMesh(mesh, o.host, server.port, server.url, logger);
  const core = mesh.node.meshCore;
  if (core) files.attach(core);
  return serveLoaded(o, {
    logger,
    mesh,
    server,
    model,
    files,
    hydration,
    meshUp,
    addr,
    modelPath: modelPath as string,
    threads,
    consoleOptions,
    apiKeys,
  });
}

/** What serving a loaded (or loading) model needs. */
interface Loaded {
  logger: Logger;
  mesh: ReturnType<typeof prepareMesh>;
  server: ReturnType<typeof startServer>;
  model: ServedModel;
  files: ReturnType<typeof mountFiles>;
  hydration: NodeHydration;
  /** Lets a split head plan: called once the mesh is up (with false when the server never started). */
  meshUp: (ok: boolean) => void;
  addr: string;
  modelPath: string;
  threads: number;
  consoleOptions: { mode: ConsoleMode; loopback: boolean };
  apiKeys: string[];
}

/** Publish the model, wait for it to load, announce its file, then serve until SIGINT/SIGTERM. */
async function serveLoaded(o: ServeOptions, l: Loaded): Promise<number> {
  const { logger, mesh, server, model, files, hydration, meshUp, addr, modelPath, threads, consoleOptions, apiKeys } = l;
  mesh.node.serveModel(model, addr, { ctxSize: o.ctxSize, slotsTotal: o.parallel });
  // Peers may pull the file from here (hashed once, then cached under the state dir).
  void files.offer(modelPath, model.id, [...model.aliases]);
  meshUp(true);

  await model.ready;
  if (model.status === "failed") {
    await mesh.node.leave();
    await server.close();
    throw new UsageError(`cannot load model ${modelPath}: ${model.error}`);
  }
  const info = model.info;
  if (info) logDevices(logger, info);
  let stage: StageNode | null = null;
  if (o.offerStage) {
    // After the engine's Worker started: Workers must not dlopen the library at the same time.
    const core = mesh.node.meshCore;
    const offered = core
      ? await offerStage({
          nodeId: mesh.nodeId,
          store: core.store,
          secret: mesh.creds.secret,
          listenHost: o.host,
          advertiseHost: addr.slice(0, addr.lastIndexOf(":")).replace(/^\[|\]$/g, ""),
          port: o.stagePort,
          stageMemoryMiB: o.stageMemory ?? null,
          threads,
          cacheDir: join(mesh.plan.stateDir, "stage-cache"),
          cacheMiB: o.stageCache,
          logger,
        })
      : { code: "stage_offer_failed" as const, message: "the mesh is not running" };
    if ("code" in offered) {
      await mesh.node.leave();
      await model.close();
      await server.close();
      throw new UsageError(`cannot offer stages: ${offered.message}`);
    }
    stage = offered;
  }
  logger.info("model ready", {
    model: model.id,
    ctx: info?.nCtx,
    parallel: info?.nParallel,
    threads,
    params: info?.nParams,
    random_weights: info?.randomWeights,
    backend: info ? backendOf(info) : undefined,
  });
  // After the join and the load: sessions routed here start coming over from the peers holding them.
  hydration.start();
  process.stderr.write(`ready: POST ${server.url}/v1/chat/completions with "model": "${model.id}"\n`);
  process.stderr.write(`${consoleLine(consoleOptions, apiKeys.length > 0, server.url)}\n`);

  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = async (signal: string) => {
      if (stopping) {
        // A second signal: stop now, without waiting for the grace period.
        process.exit(0);
      }
      stopping = true;
      logger.info("shutting down", { signal, grace_s: o.shutdownGrace });
      // Leave first: peers stop sending new requests here while the running ones finish.
      await mesh.node.leave();
      // Out of the mesh: nothing more to pull from peers (a fetch in flight is aborted, not left to its timeout).
      hydration.stop();
      server.stopAccepting();
      const deadline = Date.now() + o.shutdownGrace * 1000;
      while ((model.engine?.inFlight ?? 0) > 0 && Date.now() < deadline) await Bun.sleep(50);
      const left = model.engine?.inFlight ?? 0;
      if (left > 0) logger.warn("cancelling requests still running after the grace period", { requests: left });
      await stage?.close();
      await model.close();
      await server.close();
      logger.info("stopped");
      // ggml's stage server never returns from native code: its Worker would hold the process open.
      if (stage) process.exit(0);
      resolve(0);
    };
    process.on("SIGINT", () => void stop("SIGINT"));
    process.on("SIGTERM", () => void stop("SIGTERM"));
  });
}
