// The downloader against in-process holders serving real bytes: spread over
// holders, checked per chunk and whole, resumable, and refusing to start
// without room on disk.
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  type ChunkFetcher,
  freeBytes,
  MAX_INFLIGHT_BYTES,
  newPullStats,
  pullFile,
  type Source,
} from "../../../src/hydration/files/download";
import { chunkHash, hashFile } from "../../../src/hydration/files/hash";
import { RateLimiter } from "../../../src/hydration/files/limiter";
import { chunkRange, type FileAnnounce, rootOf } from "../../../src/hydration/files/manifest";
import { loadSidecar, partPaths } from "../../../src/hydration/files/sidecar";

const dirs: string[] = [];
function scratch(): string {
  const d = mkdtempSync(join(tmpdir(), "mesh-pull-"));
  dirs.push(d);
  return d;
}
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

const CHUNK = 4096;

/** A file of `size` pseudo-random bytes on disk, with its record. */
async function fixture(size: number): Promise<{ path: string; bytes: Buffer; announce: FileAnnounce; chunks: string[] }> {
  const bytes = Buffer.alloc(size);
  let x = 12345;
  for (let i = 0; i < size; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    bytes[i] = x >>> 24;
  }
  const path = join(scratch(), "model.gguf");
  writeFileSync(path, bytes);
  const d = await hashFile(path, CHUNK);
  return {
    path,
    bytes,
    chunks: d.chunks,
    announce: { name: "model", aliases: [], file: "model.gguf", size, hash: d.hash, chunkSize: CHUNK, root: d.root },
  };
}

/** Holders in this process: each serves `bytes`, some lie or fail as told; every request is logged. */
function holders(
  bytes: Buffer,
  chunks: string[],
  behave: Record<string, "honest" | "liar" | "dead"> = {},
): { fetcher: ChunkFetcher; log: Array<{ from: string; chunk: number }> } {
  const log: Array<{ from: string; chunk: number }> = [];
  const fetcher: ChunkFetcher = {
    manifest: async (src) => {
      if (behave[src.id] === "dead") throw new Error("unreachable");
      return { hash: chunkHash(bytes), size: bytes.length, chunkSize: CHUNK, chunks };
    },
    chunk: async (src, _hash, i, length) => {
      await Bun.sleep(1); // let other fetches interleave
      log.push({ from: src.id, chunk: i });
      if (behave[src.id] === "dead") throw new Error("unreachable");
      const { start } = chunkRange(bytes.length, CHUNK, i);
      const out = Buffer.from(bytes.subarray(start, start + length));
      if (behave[src.id] === "liar") out[0] = (out[0] ?? 0) ^ 1;
      return out;
    },
  };
  return { fetcher, log };
}

const src = (id: string): Source => ({ id, addr: `${id}:1`, name: id });

describe("pullFile", () => {
  test("spreads_chunks_over_every_holder_and_writes_an_identical_file", async () => {
    const f = await fixture(40 * CHUNK + 123);
    const { fetcher, log } = holders(f.bytes, f.chunks);
    const dest = join(scratch(), "out", "model.gguf");
    const stats = newPullStats();
    const r = await pullFile({ announce: f.announce, dest, sources: () => [src("a"), src("b")], fetcher, stats, parallel: 4 });
    expect(r.ok).toBe(true);
    expect(readFileSync(dest).equals(f.bytes)).toBe(true);
    expect(new Set(log.map((l) => l.from))).toEqual(new Set(["a", "b"]));
    expect(stats.chunksFetched).toBe(41);
    expect(existsSync(partPaths(dest).part) || existsSync(partPaths(dest).sidecar)).toBe(false);
  });

  test("refetches_a_corrupt_chunk_from_another_holder_and_stops_asking_the_liar", async () => {
    const f = await fixture(30 * CHUNK);
    const { fetcher, log } = holders(f.bytes, f.chunks, { liar: "liar" });
    const dest = join(scratch(), "model.gguf");
    const stats = newPullStats();
    const r = await pullFile({ announce: f.announce, dest, sources: () => [src("liar"), src("good")], fetcher, stats, parallel: 2 });
    expect(r.ok).toBe(true);
    expect(readFileSync(dest).equals(f.bytes)).toBe(true);
    expect(stats.chunksCorrupt).toBeGreaterThanOrEqual(1);
    // Two bad chunks and the liar is not asked again.
    expect(log.filter((l) => l.from === "liar").length).toBeLessThanOrEqual(2 + 1);
  });

  test("finishes_from_the_holders_left_when_one_dies", async () => {
    const f = await fixture(20 * CHUNK);
    const behave: Record<string, "honest" | "dead"> = {};
    const { fetcher } = holders(f.bytes, f.chunks, behave);
    let served = 0;
    const dying: ChunkFetcher = {
      manifest: fetcher.manifest,
      chunk: async (s, h, i, n, sig) => {
        if (s.id === "a" && ++served > 3) behave.a = "dead";
        return fetcher.chunk(s, h, i, n, sig);
      },
    };
    const dest = join(scratch(), "model.gguf");
    const stats = newPullStats();
    const r = await pullFile({ announce: f.announce, dest, sources: () => [src("a"), src("b")], fetcher: dying, stats, parallel: 4 });
    expect(r.ok).toBe(true);
    expect(readFileSync(dest).equals(f.bytes)).toBe(true);
    expect(stats.fetchFailures).toBeGreaterThanOrEqual(1);
  });

  test("resumes_after_a_stop_without_fetching_verified_chunks_again", async () => {
    const f = await fixture(50 * CHUNK);
    const { fetcher, log } = holders(f.bytes, f.chunks);
    const dest = join(scratch(), "model.gguf");
    const stop = new AbortController();
    const first = await pullFile({
      announce: f.announce,
      dest,
      sources: () => [src("a")],
      fetcher,
      stats: newPullStats(),
      parallel: 1,
      signal: stop.signal,
      onProgress: (p) => {
        if (p.chunksDone >= 10) stop.abort();
      },
    });
    expect(first.ok).toBe(false);
    expect(existsSync(dest)).toBe(false); // a partial file never passes for whole
    expect(existsSync(partPaths(dest).part)).toBe(true);
    const kept = loadSidecar(dest, f.announce);
    expect(kept.size).toBeGreaterThanOrEqual(10);
    log.length = 0;
    const stats = newPullStats();
    const second = await pullFile({ announce: f.announce, dest, sources: () => [src("a")], fetcher, stats });
    expect(second.ok).toBe(true);
    if (!second.ok) return;
    expect(readFileSync(dest).equals(f.bytes)).toBe(true);
    expect(second.value.resumedChunks).toBe(kept.size);
    expect(second.value.resumedChunks + second.value.fetchedChunks).toBe(50);
    // Nothing verified before was asked for again.
    expect(log.filter((l) => kept.has(l.chunk))).toEqual([]);
    expect(log.length).toBe(second.value.fetchedChunks);
    expect(stats.chunksResumed).toBe(kept.size);
  });

  test("a_damaged_part_file_fails_the_whole_hash_and_its_bad_chunks_are_fetched_again", async () => {
    const f = await fixture(12 * CHUNK);
    const { fetcher } = holders(f.bytes, f.chunks);
    const dest = join(scratch(), "model.gguf");
    const stop = new AbortController();
    await pullFile({
      announce: f.announce,
      dest,
      sources: () => [src("a")],
      fetcher,
      stats: newPullStats(),
      parallel: 1,
      signal: stop.signal,
      onProgress: (p) => {
        if (p.chunksDone >= 6) stop.abort();
      },
    });
    // The sidecar says chunk 0 is verified, but the disk under it rots.
    const part = partPaths(dest).part;
    const bytes = readFileSync(part);
    bytes[1] = (bytes[1] ?? 0) ^ 0xff;
    writeFileSync(part, bytes);
    const stats = newPullStats();
    const r = await pullFile({ announce: f.announce, dest, sources: () => [src("a")], fetcher, stats });
    expect(r.ok).toBe(true);
    expect(stats.wholeMismatches).toBe(1);
    expect(readFileSync(dest).equals(f.bytes)).toBe(true);
  });

  test("refuses_to_start_without_disk_room_and_writes_nothing", async () => {
    const size = freeBytes(tmpdir()) + 1024 ** 3;
    const chunkSize = 256 * 1024 * 1024;
    const chunks = Array.from({ length: Math.ceil(size / chunkSize) }, (_, i) => chunkHash(Buffer.from(String(i))));
    const announce: FileAnnounce = {
      name: "huge",
      aliases: [],
      file: "huge.gguf",
      size,
      hash: chunkHash(Buffer.from("x")),
      chunkSize,
      root: rootOf(chunks),
    };
    let asked = 0;
    const fetcher: ChunkFetcher = {
      manifest: async () => {
        asked++;
        return { hash: announce.hash, size, chunkSize, chunks };
      },
      chunk: async () => {
        asked++;
        return new Uint8Array();
      },
    };
    const dir = join(scratch(), "never");
    const r = await pullFile({ announce, dest: join(dir, "huge.gguf"), sources: () => [src("a")], fetcher, stats: newPullStats() });
    expect(r.ok).toBe(false);
    if (r.ok) return;
    expect(r.code).toBe("no_space");
    expect(r.message).toContain("not enough disk space");
    expect(asked).toBe(0);
    expect(existsSync(dir)).toBe(false);
  });

  test("stops_with_no_sources_when_every_holder_fails_and_keeps_what_was_verified", async () => {
    const f = await fixture(10 * CHUNK);
    const behave: Record<string, "honest" | "dead"> = {};
    const { fetcher } = holders(f.bytes, f.chunks, behave);
    let n = 0;
    const failing: ChunkFetcher = {
      manifest: fetcher.manifest,
      chunk: async (s, h, i, len, sig) => {
        if (++n > 4) behave.a = "dead";
        return fetcher.chunk(s, h, i, len, sig);
      },
    };
    const dest = join(scratch(), "model.gguf");
    const r = await pullFile({
      announce: f.announce,
      dest,
      sources: () => [src("a")],
      fetcher: failing,
      stats: newPullStats(),
      parallel: 1,
      retryBaseMs: 1,
    });
    expect(r.ok).toBe(false);
    if (r.ok) return;
    expect(r.code).toBe("no_sources");
    expect(existsSync(dest)).toBe(false);
    expect(existsSync(partPaths(dest).sidecar)).toBe(true);
  });
});

describe("pullFile from a holder under an upload cap", () => {
  test("fetches_timing_out_together_count_as_one_failure_and_the_holder_is_then_asked_for_fewer_at_once", async () => {
    // One holder behind a shared byte-rate cap (as --upload-limit does): a chunk takes 50 ms, so four at once fit
    // inside the chunk timeout and eight at once do not. The holder is alive and sending: the downloader must ask it
    // for fewer chunks at once rather than keep timing out (each timed-out fetch burns the holder's capped bandwidth).
    const f = await fixture(32 * CHUNK);
    const cap = new RateLimiter(CHUNK * 20, 0);
    let served = 0;
    const slow: ChunkFetcher = {
      manifest: async () => ({ hash: f.announce.hash, size: f.bytes.length, chunkSize: CHUNK, chunks: f.chunks }),
      chunk: async (_s, _h, i, length, signal) => {
        const { start } = chunkRange(f.bytes.length, CHUNK, i);
        for (let at = 0; at < length; at += 512) {
          await cap.take(Math.min(512, length - at));
          if (signal.aborted) throw new Error("timed out");
        }
        served++;
        return Buffer.from(f.bytes.subarray(start, start + length));
      },
    };
    const dest = join(scratch(), "model.gguf");
    const stats = newPullStats();
    const r = await pullFile({
      announce: f.announce,
      dest,
      sources: () => [src("a")],
      fetcher: slow,
      stats,
      chunkTimeoutMs: 300,
      retryBaseMs: 1,
    });
    expect(r.ok ? "ok" : r.message).toBe("ok");
    expect(readFileSync(dest).equals(f.bytes)).toBe(true);
    expect(served).toBe(32);
    expect(stats.fetchFailures).toBeGreaterThan(0); // the first eight did time out together
    // Not a timeout per chunk: once asked for fewer at once, the holder's chunks arrive within the timeout.
    expect(stats.fetchFailures).toBeLessThan(16);
  }, 60_000);

  test("a_burst_of_failures_in_flight_together_does_not_give_up_on_the_holder", async () => {
    // Eight fetches in flight fail at once (one dropped connection); the next ones succeed: the holder must stay.
    const f = await fixture(24 * CHUNK);
    const { fetcher } = holders(f.bytes, f.chunks);
    let calls = 0;
    let release: () => void = () => {};
    const gate = new Promise<void>((r) => {
      release = r;
    });
    const blip: ChunkFetcher = {
      manifest: fetcher.manifest,
      chunk: async (s, h, i, n, sig) => {
        if (++calls <= 8) {
          if (calls === 8) release();
          await gate; // all eight in flight, then all fail
          throw new Error("connection reset");
        }
        return fetcher.chunk(s, h, i, n, sig);
      },
    };
    const dest = join(scratch(), "model.gguf");
    const stats = newPullStats();
    const r = await pullFile({ announce: f.announce, dest, sources: () => [src("a")], fetcher: blip, stats, retryBaseMs: 1 });
    expect(r.ok ? "ok" : r.message).toBe("ok");
    expect(readFileSync(dest).equals(f.bytes)).toBe(true);
    expect(stats.fetchFailures).toBe(8);
  });
});

describe("pullFile of one file twice at once", () => {
  test("a_second_download_of_the_same_file_is_refused_as_busy_and_the_first_finishes_whole", async () => {
    // `mesh pull` beside a `mesh serve --model` pulling the same file: both wrote one part file and sidecar, and the
    // second to finish failed on the first one's rename, leaving a sidecar with no part file behind.
    const f = await fixture(40 * CHUNK);
    const { fetcher } = holders(f.bytes, f.chunks);
    let release: () => void = () => {};
    const gate = new Promise<void>((r) => {
      release = r;
    });
    let started = 0;
    const held: ChunkFetcher = {
      manifest: fetcher.manifest,
      chunk: async (s, h, i, n, sig) => {
        started++;
        await gate; // the first download holds its chunks until the second has tried
        return fetcher.chunk(s, h, i, n, sig);
      },
    };
    const dest = join(scratch(), "model.gguf");
    const first = pullFile({ announce: f.announce, dest, sources: () => [src("a")], fetcher: held, stats: newPullStats(), parallel: 2 });
    while (started === 0) await Bun.sleep(1);
    const second = await pullFile({ announce: f.announce, dest, sources: () => [src("a")], fetcher, stats: newPullStats() });
    expect(second.ok ? "ok" : second.code).toBe("busy");
    release();
    const r = await first;
    expect(r.ok ? "ok" : r.message).toBe("ok");
    expect(readFileSync(dest).equals(f.bytes)).toBe(true);
    for (const p of [partPaths(dest).part, partPaths(dest).sidecar, `${partPaths(dest).part}.lock`]) expect(existsSync(p)).toBe(false);
  });

  test("a_lock_left_by_a_process_killed_mid_pull_is_taken_over", async () => {
    const f = await fixture(8 * CHUNK);
    const { fetcher } = holders(f.bytes, f.chunks);
    const dest = join(scratch(), "model.gguf");
    const gone = Bun.spawn(["true"]);
    await gone.exited;
    writeFileSync(`${partPaths(dest).part}.lock`, `${gone.pid} 0`);
    const r = await pullFile({ announce: f.announce, dest, sources: () => [src("a")], fetcher, stats: newPullStats() });
    expect(r.ok ? "ok" : r.message).toBe("ok");
    expect(readFileSync(dest).equals(f.bytes)).toBe(true);
    expect(existsSync(`${partPaths(dest).part}.lock`)).toBe(false);
    // A lock with this very pid that this process does not hold: left by an earlier life under the same pid
    // (pid 1 in a container restarted on the same volume).
    rmSync(dest);
    writeFileSync(`${partPaths(dest).part}.lock`, `${process.pid} 0`);
    const again = await pullFile({ announce: f.announce, dest, sources: () => [src("a")], fetcher, stats: newPullStats() });
    expect(again.ok ? "ok" : again.message).toBe("ok");
  });
});

describe("pullFile of large chunks", () => {
  test("fetches_in_flight_hold_at_most_MAX_INFLIGHT_BYTES_of_chunks_however_large_the_holders_chunks", async () => {
    // A holder may cut its file into chunks of up to 256 MiB, and each fetch buffers a whole chunk: 16 fetches at
    // once would hold gigabytes. Count the fetches in flight at once (they fail, so nothing is really buffered).
    const chunkSize = 64 * 1024 * 1024;
    const n = 8;
    const chunks = Array.from({ length: n }, (_, i) => chunkHash(Buffer.from(`chunk ${i}`)));
    const announce: FileAnnounce = {
      name: "big",
      aliases: [],
      file: "big.gguf",
      size: n * chunkSize,
      hash: chunkHash(Buffer.from("big")),
      chunkSize,
      root: rootOf(chunks),
    };
    let now = 0;
    let most = 0;
    const fetcher: ChunkFetcher = {
      manifest: async () => ({ hash: announce.hash, size: announce.size, chunkSize, chunks }),
      chunk: async () => {
        most = Math.max(most, ++now);
        await Bun.sleep(20);
        now--;
        throw new Error("unreachable");
      },
    };
    const r = await pullFile({
      announce,
      dest: join(scratch(), "big.gguf"),
      sources: () => [src("a"), src("b")],
      fetcher,
      stats: newPullStats(),
      retryBaseMs: 1,
    });
    expect(r.ok ? "ok" : r.code).toBe("no_sources");
    expect(most).toBeGreaterThan(0);
    expect(most * chunkSize).toBeLessThanOrEqual(MAX_INFLIGHT_BYTES);
  });
});
