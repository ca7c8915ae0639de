// The model-file side of `mesh serve`: announce the file a node serves, and,
// for `--model <name>` naming a model only peers have, pull it from them while
// the node already serves HTTP and forwards requests for it.
import { existsSync } from "node:fs";
import { join } from "node:path";
import { meshFetcher } from "../hydration/files/fetcher";
import { parseRate } from "../hydration/files/limiter";
import { DEFAULT_CHUNK, type FileAnnounce, isFileName, MAX_CHUNK, MIN_CHUNK } from "../hydration/files/manifest";
import { progressMode, progressPrinter } from "../hydration/files/progress";
import { FileService } from "../hydration/files/service";
import type { Logger } from "../log";
import { meshKeys } from "../mesh/auth";
import { MeshClient } from "../mesh/client";
import type { PreparedMesh } from "./serve-mesh";
import { UsageError } from "./usage";

/** File flags of `mesh serve`, as parsed by commander. */
export interface FileFlags {
  /** Bytes per second all uploads of model files together may use, e.g. "50M"; absent or "0": no cap. */
  uploadLimit?: string;
  /** Chunk size this node cuts the files it announces into. */
  fileChunkSize?: number;
  /** Seconds `--model <name>` waits for a member that announces the model. */
  pullWait?: number;
  /** Test fault only (hidden flag): every chunk this node uploads has a byte flipped. */
  faultCorruptUploads?: boolean;
}

/** Where pulled model files live: `<state dir>/models`. */
export function modelsDir(stateDir: string): string {
  return join(stateDir, "models");
}

/** Whether `--model` names a model (to look up in the mesh) rather than a path: no directory part. */
export function isModelName(v: string): boolean {
  return v.length > 0 && !v.includes("/") && !v.includes("\\") && v !== "." && v !== "..";
}

/** A file pulled earlier for `name` under the state dir, if there is one. */
export function pulledFile(stateDir: string, name: string): string | null {
  if (!isFileName(name)) return null;
  for (const f of [name, `${name}.gguf`]) {
    const p = join(modelsDir(stateDir), f);
    if (existsSync(p)) return p;
  }
  return null;
}

/** Check the file flags; throws UsageError. */
export function checkFileFlags(f: FileFlags): { uploadLimit: number; chunkSize: number } {
  const uploadLimit = f.uploadLimit === undefined ? 0 : parseRate(f.uploadLimit);
  if (uploadLimit === null) throw new UsageError(`--upload-limit must be bytes per second such as 500k, 20M or 1G, got '${f.uploadLimit}'`);
  const chunkSize = f.fileChunkSize ?? DEFAULT_CHUNK;
  if (chunkSize < MIN_CHUNK || chunkSize > MAX_CHUNK)
    throw new UsageError(`--file-chunk-size must be from ${MIN_CHUNK} to ${MAX_CHUNK} bytes`);
  return { uploadLimit, chunkSize };
}

/** The node's FileService, mounted on its mesh routes (uploads, GET /api/files, /metrics). */
export function mountFiles(mesh: PreparedMesh, f: FileFlags, logger: Logger): FileService {
  const { uploadLimit, chunkSize } = checkFileFlags(f);
  const client = new MeshClient({ keys: meshKeys(mesh.creds.secret), nodeId: mesh.nodeId });
  const files = new FileService({
    selfId: mesh.nodeId,
    stateDir: mesh.plan.stateDir,
    uploadLimit,
    chunkSize,
    fetcher: meshFetcher(client),
    log: logger,
    corruptUploads: f.faultCorruptUploads === true,
  });
  mesh.node.hooks.files = files;
  return files;
}

/**
 * Wait for a member announcing `name`, then pull it into the state dir's models folder (resuming what an
 * earlier run left). A pass that loses every holder keeps its chunks and waits for one again.
 * Resolves with the verified file and the record it was pulled by; throws UsageError when no member
 * announces the model in time or the disk is too small.
 */
export async function pullForServe(
  files: FileService,
  name: string,
  o: { stateDir: string; waitS: number; logger: Logger; signal: AbortSignal },
): Promise<{ path: string; announce: FileAnnounce }> {
  const dest = (a: FileAnnounce) => join(modelsDir(o.stateDir), a.file);
  files.waiting(name, join(modelsDir(o.stateDir), `${name}.gguf`));
  let deadline = Date.now() + o.waitS * 1000;
  let said = false;
  let busySaid = false;
  for (;;) {
    if (o.signal.aborted) throw new UsageError(`stopped before ${name} was pulled (what was verified is kept)`);
    const found = files.find(name);
    if (!found) {
      if (Date.now() > deadline) {
        throw new UsageError(
          `no member of the mesh announces a model named '${name}' (waited ${o.waitS} s): 'mesh models' lists what the mesh has`,
        );
      }
      if (!said) {
        process.stderr.write(`waiting for a member of the mesh that has '${name}'...\n`);
        said = true;
      }
      await Bun.sleep(250);
      continue;
    }
    const { announce } = found;
    process.stderr.write(
      `pulling ${announce.file} (${announce.size} bytes, BLAKE3 ${announce.hash.slice(0, 16)}…) from ${found.holders.map((h) => h.name).join(", ")}\n`,
    );
    const print = progressPrinter(announce.file, {
      mode: progressMode(false, process.stderr.isTTY === true),
      write: (s) => process.stderr.write(s),
    });
    const r = await files.hydrate(announce, dest(announce), { signal: o.signal, onProgress: print });
    if (r.ok) {
      o.logger.info("model file pulled", {
        model: announce.name,
        resumed_chunks: r.value.resumedChunks,
        fetched_chunks: r.value.fetchedChunks,
      });
      return { path: r.value.path, announce };
    }
    if (r.code === "no_space") throw new UsageError(r.message);
    if (r.code === "aborted") throw new UsageError(`stopped before ${name} was pulled (what was verified is kept)`);
    if (r.code === "verify_failed" || r.code === "io") throw new Error(r.message);
    if (r.code === "busy") {
      // Another process (`mesh pull`) pulls the very file: wait for it; its verified file is then taken as is.
      if (!busySaid) o.logger.warn("another download of the model file is running; waiting for it", { model: name, error: r.message });
      busySaid = true;
      deadline = Date.now() + o.waitS * 1000;
      await Bun.sleep(1000);
      continue;
    }
    // Every holder failed or left: the verified chunks stay; wait for a holder again (best effort, the next pass resumes).
    o.logger.warn("pull paused: no holder answers; waiting for one", { model: name, error: r.message });
    deadline = Date.now() + o.waitS * 1000;
    await Bun.sleep(1000);
  }
}
