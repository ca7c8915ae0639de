// The downloader: pulls one announced file from the peers that hold it, in
// parallel chunk-sized byte ranges spread over every holder, checks each chunk
// against the manifest (whose root the holder's signed record vouches for),
// writes it into `<file>.part` and records it in the sidecar, so a restart or
// a dead source loses at most the chunks in flight. A chunk that fails its
// hash is counted and fetched again from another holder; a holder that sends
// two bad chunks is not asked again. At the end the whole file is hashed; only
// then is it renamed into place.

import { existsSync, mkdirSync, statfsSync } from "node:fs";
import { open, rename } from "node:fs/promises";
import { dirname } from "node:path";
import { Blake3Hasher } from "@napi-rs/blake-hash";
import type { Logger } from "../../log";
import { chunkHash, type FileDigest, rememberDigest } from "./hash";
import { formatBytes } from "./limiter";
import { checkManifest, chunkCount, chunkRange, type FileAnnounce, type FileManifest } from "./manifest";
import { type ChunkSet, dropPartial, loadSidecar, lockPartial, partPaths, saveSidecar } from "./sidecar";

/** A holder of the file. */
export interface Source {
  /** Its node id (requests name it). */
  id: string;
  addr: string;
  name: string;
}

/** How bytes are asked of a holder (over authenticated mesh HTTP in the product). */
export interface ChunkFetcher {
  /** The holder's manifest JSON for `hash` (checked by the caller). */
  manifest(src: Source, hash: string, signal: AbortSignal): Promise<unknown>;
  /** Exactly `length` bytes of chunk `i`; throws on anything else. */
  chunk(src: Source, hash: string, i: number, length: number, signal: AbortSignal): Promise<Uint8Array>;
}

/** Counters of every download of a process, for /metrics. */
export interface PullStats {
  bytesFetched: number;
  chunksFetched: number;
  /** Chunks whose bytes did not match the manifest (then fetched again elsewhere). */
  chunksCorrupt: number;
  /** Chunks a restarted download found verified on disk and did not fetch again. */
  chunksResumed: number;
  /** Fetches that failed (unreachable, timed out, cut short, refused). */
  fetchFailures: number;
  /** Finished files whose whole-file hash did not match (their bad chunks were fetched again). */
  wholeMismatches: number;
  completed: number;
  failed: number;
}

/** A fresh set of counters. */
export function newPullStats(): PullStats {
  return {
    bytesFetched: 0,
    chunksFetched: 0,
    chunksCorrupt: 0,
    chunksResumed: 0,
    fetchFailures: 0,
    wholeMismatches: 0,
    completed: 0,
    failed: 0,
  };
}

/** Where a download stands. */
export interface PullProgress {
  phase: "manifest" | "fetching" | "verifying" | "done";
  doneBytes: number;
  totalBytes: number;
  chunksDone: number;
  chunks: number;
  /** Holders being fetched from. */
  sources: number;
  /** Bytes per second fetched so far in this run (resumed chunks not counted). */
  bytesPerSec: number;
}

/** Why a download stopped. */
/** busy: another download of the same file (another process, or this one) is running. */
export type PullErrorCode = "no_space" | "no_sources" | "aborted" | "io" | "verify_failed" | "busy";

/** The outcome of a download. */
export type PullResult =
  | { ok: true; value: { path: string; resumedChunks: number; fetchedChunks: number; digest: FileDigest } }
  | { ok: false; code: PullErrorCode; message: string };

/** What a download needs. */
export interface PullOptions {
  announce: FileAnnounce;
  /** Where the finished file goes; `<dest>.part` and `<dest>.part.json` meanwhile. */
  dest: string;
  /** The holders now (asked again whenever every known one has failed). */
  sources: () => Source[];
  fetcher: ChunkFetcher;
  stats: PullStats;
  /** Chunk fetches in flight at once, over all holders (default 16). */
  parallel?: number;
  /** Chunk fetches in flight to one holder at once (default 8). */
  perHolder?: number;
  /** Longest one chunk may take (default 120 s). */
  chunkTimeoutMs?: number;
  /** First back-off after a holder fails, doubled on each failure in a row (default 200 ms, at most 10 s). */
  retryBaseMs?: number;
  /** Cache the finished file's digest here, so serving it does not hash it again. */
  stateDir?: string;
  onProgress?: (p: PullProgress) => void;
  signal?: AbortSignal;
  log?: Logger;
}

interface SourceState {
  src: Source;
  inflight: number;
  fails: number;
  corrupt: number;
  downUntil: number;
  /** Fetches this holder may have in flight now: halved when fetches fail, grown back by successes (up to perHolder). */
  window: number;
  /** When its last counted failure happened: fetches already in flight then fail with it, they count as that one failure. */
  failedAt: number;
}

// A holder that failed this many times in a row, or sent this many bad chunks, is not asked again in this run.
const MAX_FAILS = 5;
const MAX_CORRUPT = 2;
const SIDECAR_EVERY_MS = 250;
const REFRESH_MS = 1000;
const MAX_PARALLEL = 16;
/**
 * Most chunk bytes a download holds in memory at once: every fetch in flight buffers its whole chunk (and a copy
 * while it is assembled), so with a holder's --file-chunk-size of 256 MiB, 16 fetches would hold 4 to 8 GiB.
 * Fewer fetches run at once when chunks are large (at least one).
 */
export const MAX_INFLIGHT_BYTES = 128 * 1024 * 1024;
const PER_HOLDER = 8;
const MAX_WHOLE_ROUNDS = 3;
// Free room kept beyond the file itself (filesystems misbehave when completely full).
const SPACE_MARGIN = 16 * 1024 * 1024;

/** Free bytes on the filesystem that holds `path` (or its nearest existing parent). */
export function freeBytes(path: string): number {
  let p = path;
  while (!existsSync(p) && dirname(p) !== p) p = dirname(p);
  const s = statfsSync(p);
  return Number(s.bavail) * Number(s.bsize);
}

/** Download `o.announce` into `o.dest`; never throws (errors are values). */
export async function pullFile(o: PullOptions): Promise<PullResult> {
  const a = o.announce;
  const total = chunkCount(a.size, a.chunkSize);
  const signal = o.signal ?? new AbortController().signal;
  const started = performance.now();
  let fetchedBytes = 0;
  const states = new Map<string, SourceState>();
  const refresh = () => {
    for (const s of o.sources())
      if (!states.has(s.id))
        states.set(s.id, { src: s, inflight: 0, fails: 0, corrupt: 0, downUntil: 0, window: o.perHolder ?? PER_HOLDER, failedAt: -1 });
  };
  refresh();
  const usable = () => [...states.values()].filter((s) => s.fails < MAX_FAILS && s.corrupt < MAX_CORRUPT);
  const progress = (phase: PullProgress["phase"], done: ChunkSet) => {
    const doneBytes = bytesHeld(a, done);
    const secs = (performance.now() - started) / 1000;
    o.onProgress?.({
      phase,
      doneBytes,
      totalBytes: a.size,
      chunksDone: done.size,
      chunks: total,
      sources: usable().length,
      bytesPerSec: secs > 0 ? fetchedBytes / secs : 0,
    });
  };

  // 1. What a previous run left, and room for the rest (the signed record gives the size), before anything is asked or written.
  let done = loadSidecar(o.dest, a);
  const need = a.size - bytesHeld(a, done);
  let free: number;
  try {
    free = freeBytes(o.dest);
  } catch (e) {
    return fail(o, "io", `cannot check free space for ${o.dest}: ${(e as Error).message}`);
  }
  if (free < need + SPACE_MARGIN) {
    return fail(
      o,
      "no_space",
      `not enough disk space for ${a.file}: it needs ${formatBytes(need)} more and ${dirname(o.dest)} has ${formatBytes(free)} free`,
    );
  }
  // 2. The chunk list, from any holder, checked against the signed root.
  let manifest: FileManifest | null = null;
  for (const s of usable()) {
    if (signal.aborted) return fail(o, "aborted", "the download was stopped");
    try {
      manifest = checkManifest(await o.fetcher.manifest(s.src, a.hash, AbortSignal.any([signal, AbortSignal.timeout(30_000)])), a);
    } catch (e) {
      o.log?.debug("manifest fetch failed", { from: s.src.name, error: (e as Error)?.message });
    }
    if (manifest) break;
    s.fails++;
    o.stats.fetchFailures++;
  }
  if (!manifest) return fail(o, "no_sources", `no holder of ${a.file} gave a chunk list that matches its announcement`);

  const { part } = partPaths(o.dest);
  let lock: ReturnType<typeof lockPartial>;
  try {
    mkdirSync(dirname(o.dest), { recursive: true });
    lock = lockPartial(o.dest);
  } catch (e) {
    return fail(o, "io", `cannot write ${part}.lock: ${(e as Error).message}`);
  }
  if ("heldBy" in lock) {
    return fail(o, "busy", `another download of ${a.file} into ${dirname(o.dest)} is running (process ${lock.heldBy}): ${part}.lock`);
  }
  // What is verified now, under the lock (a download that held it before may have added to it).
  done = loadSidecar(o.dest, a);
  const resumed = done.size;
  let fetched = 0;
  if (resumed > 0) {
    o.stats.chunksResumed += resumed;
    o.log?.info("resuming a download", { file: a.file, chunks_verified: done.size, chunks: total });
  }

  let fh: Awaited<ReturnType<typeof open>>;
  try {
    fh = await open(part, done.size > 0 ? "r+" : "w+");
    await fh.truncate(a.size);
  } catch (e) {
    lock.release();
    return fail(o, "io", `cannot write ${part}: ${(e as Error).message}`);
  }
  let lastSave = 0;
  const save = (force: boolean) => {
    const now = performance.now();
    if (!force && now - lastSave < SIDECAR_EVERY_MS) return;
    lastSave = now;
    saveSidecar(o.dest, a, done);
  };
  try {
    save(true);
    for (let round = 0; ; round++) {
      // 3. Every missing chunk, spread over the holders.
      const pending: number[] = [];
      for (let i = 0; i < total; i++) if (!done.has(i)) pending.push(i);
      progress("fetching", done);
      const err = await fetchAll(o, manifest, pending, done, usable, refresh, fh, signal, (n) => {
        fetchedBytes += n;
        fetched++;
        save(false);
        progress("fetching", done);
      });
      save(true);
      if (err) return fail(o, err.code, err.message);
      // 4. The whole file, hashed again from disk.
      progress("verifying", done);
      const check = await verifyWhole(fh, manifest);
      if (check.hash === a.hash) {
        await fh.sync();
        await fh.close();
        await rename(part, o.dest);
        dropPartial(o.dest);
        const digest: FileDigest = { size: a.size, hash: a.hash, chunkSize: a.chunkSize, chunks: manifest.chunks, root: a.root };
        if (o.stateDir) rememberDigest(o.stateDir, o.dest, digest);
        o.stats.completed++;
        progress("done", done);
        return { ok: true, value: { path: o.dest, resumedChunks: resumed, fetchedChunks: fetched, digest } };
      }
      o.stats.wholeMismatches++;
      for (const i of check.bad) done.delete(i);
      save(true);
      o.log?.warn("the finished file did not match its hash; fetching its bad chunks again", {
        file: a.file,
        bad_chunks: check.bad.length,
      });
      if (round + 1 >= MAX_WHOLE_ROUNDS || check.bad.length === 0) {
        return fail(o, "verify_failed", `${a.file} did not match its announced BLAKE3 hash after ${round + 1} attempts`);
      }
    }
  } catch (e) {
    return fail(o, "io", `writing ${part} failed: ${(e as Error).message}`);
  } finally {
    await fh.close().catch(() => {});
    lock.release();
  }
}

/** Bytes of the chunks in `done` (every chunk is whole but the last). */
function bytesHeld(a: FileAnnounce, done: ChunkSet): number {
  const total = chunkCount(a.size, a.chunkSize);
  if (total === 0) return 0;
  const last = a.size - (total - 1) * a.chunkSize;
  return done.has(total - 1) ? (done.size - 1) * a.chunkSize + last : done.size * a.chunkSize;
}

function fail(o: PullOptions, code: PullErrorCode, message: string): PullResult {
  o.stats.failed++;
  return { ok: false, code, message };
}

async function fetchAll(
  o: PullOptions,
  m: FileManifest,
  pending: number[],
  done: ChunkSet,
  usable: () => SourceState[],
  refresh: () => void,
  fh: Awaited<ReturnType<typeof open>>,
  signal: AbortSignal,
  onChunk: (bytes: number) => void,
): Promise<{ code: PullErrorCode; message: string } | null> {
  const a = o.announce;
  const failedOn = new Map<number, Set<string>>();
  let error: { code: PullErrorCode; message: string } | null = null;
  let inflight = 0;
  const perHolder = o.perHolder ?? PER_HOLDER;
  let refreshedAt = performance.now();
  const pick = (i: number): SourceState | null => {
    const now = performance.now();
    let list = usable().filter((s) => s.downUntil <= now && s.inflight < Math.floor(s.window));
    const avoid = failedOn.get(i);
    const fresh = list.filter((s) => !avoid?.has(s.src.id));
    if (fresh.length > 0) list = fresh;
    list.sort((x, y) => x.inflight - y.inflight || x.fails - y.fails);
    return list[0] ?? null;
  };
  const worker = async () => {
    while (error === null) {
      if (signal.aborted) {
        error = { code: "aborted", message: "the download was stopped" };
        return;
      }
      const i = pending.shift();
      if (i === undefined) {
        // Another worker may still put a failed chunk back: wait for it while any are in flight.
        if (inflight === 0) return;
        await Bun.sleep(20);
        continue;
      }
      // Holders that announced the file since the download began join in (at most a check a second).
      if (performance.now() - refreshedAt > REFRESH_MS || usable().length === 0) {
        refresh();
        refreshedAt = performance.now();
      }
      const s = pick(i);
      if (!s) {
        pending.unshift(i);
        const live = usable();
        if (live.length === 0) {
          if (inflight > 0) {
            await Bun.sleep(50);
            continue;
          }
          error = {
            code: "no_sources",
            message: `every holder of ${a.file} failed or left; ${done.size} of ${m.chunks.length} chunks are kept for a later try`,
          };
          return;
        }
        // Every usable holder is busy or backing off: wait a little for one.
        const until = Math.min(...live.map((w) => (w.inflight < Math.floor(w.window) ? w.downUntil : performance.now() + 10)));
        await Bun.sleep(Math.max(5, Math.min(1000, until - performance.now())));
        continue;
      }
      const { start, end } = chunkRange(a.size, a.chunkSize, i);
      s.inflight++;
      inflight++;
      const startedAt = performance.now();
      try {
        const bytes = await o.fetcher.chunk(
          s.src,
          a.hash,
          i,
          end - start,
          AbortSignal.any([signal, AbortSignal.timeout(o.chunkTimeoutMs ?? 120_000)]),
        );
        o.stats.bytesFetched += bytes.byteLength;
        if (bytes.byteLength !== end - start || chunkHash(bytes) !== m.chunks[i]) {
          o.stats.chunksCorrupt++;
          s.corrupt++;
          (failedOn.get(i) ?? failedOn.set(i, new Set()).get(i))?.add(s.src.id);
          o.log?.warn("a chunk did not match its hash; fetching it from another holder", { file: a.file, chunk: i, from: s.src.name });
          pending.unshift(i);
          continue;
        }
        await fh.write(bytes, 0, bytes.byteLength, start);
        done.add(i);
        s.fails = 0;
        s.window = Math.min(perHolder, s.window + 1 / s.window);
        o.stats.chunksFetched++;
        onChunk(bytes.byteLength);
      } catch (e) {
        if (signal.aborted) {
          pending.unshift(i);
          continue; // the loop reports the stop
        }
        o.stats.fetchFailures++;
        // Fetches that were in flight together fail together (a holder under --upload-limit times out all of them at
        // once, a dead one refuses all of them): that is one failure of the holder, not one per fetch, and it halves
        // how many it is asked for at once, so a slow holder is asked for what it can send within the timeout.
        if (startedAt >= s.failedAt) {
          s.failedAt = performance.now();
          s.fails++;
          s.window = Math.max(1, Math.floor(s.window / 2));
          s.downUntil = performance.now() + Math.min(10_000, (o.retryBaseMs ?? 200) * 2 ** s.fails);
        }
        (failedOn.get(i) ?? failedOn.set(i, new Set()).get(i))?.add(s.src.id);
        o.log?.debug("chunk fetch failed", { file: a.file, chunk: i, from: s.src.name, error: (e as Error)?.message });
        pending.unshift(i);
      } finally {
        s.inflight--;
        inflight--;
      }
    }
  };
  const n = Math.max(1, Math.min(o.parallel ?? MAX_PARALLEL, Math.floor(MAX_INFLIGHT_BYTES / a.chunkSize)));
  await Promise.all(Array.from({ length: n }, worker));
  return error;
}

/**
 * Hash the written file whole; only when that does not match, hash each chunk again to find the bad
 * ones (one BLAKE3 pass over the file in the usual case).
 */
async function verifyWhole(fh: Awaited<ReturnType<typeof open>>, m: FileManifest): Promise<{ hash: string; bad: number[] }> {
  const buf = Buffer.allocUnsafe(Math.min(Math.max(m.chunkSize, 1), 4 * 1024 * 1024));
  const whole = new Blake3Hasher();
  for (let at = 0; at < m.size; ) {
    const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, m.size - at), at);
    if (bytesRead === 0) break;
    whole.update(buf.subarray(0, bytesRead));
    at += bytesRead;
  }
  const hash = whole.digest("hex");
  const bad: number[] = [];
  if (hash === m.hash) return { hash, bad };
  for (let i = 0; i < m.chunks.length; i++) {
    const { start, end } = chunkRange(m.size, m.chunkSize, i);
    const h = new Blake3Hasher();
    for (let at = start; at < end; ) {
      const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, end - at), at);
      if (bytesRead === 0) break;
      h.update(buf.subarray(0, bytesRead));
      at += bytesRead;
    }
    if (h.digest("hex") !== m.chunks[i]) bad.push(i);
  }
  return { hash, bad };
}
