// Hashing a model file once: chunk and whole hashes, and a bounded cache by
// (path, size, mtime, chunk size) so a restart does not hash it again.

import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { blake3 } from "@napi-rs/blake-hash";
import { cachedDigest, digestOf, hashFile, MAX_CACHED, rememberDigest } from "../../../src/hydration/files/hash";
import { rootOf } from "../../../src/hydration/files/manifest";

const dir = mkdtempSync(join(tmpdir(), "mesh-hash-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("hashFile", () => {
  test("hashes_each_chunk_and_the_whole_file", async () => {
    const bytes = Buffer.alloc(10_000, 7);
    bytes[9999] = 1;
    const p = join(dir, "f.gguf");
    writeFileSync(p, bytes);
    const d = await hashFile(p, 4096);
    expect(d.size).toBe(10_000);
    expect(d.hash).toBe(blake3(bytes).toString("hex"));
    expect(d.chunks).toEqual([0, 4096, 8192].map((s) => blake3(bytes.subarray(s, s + 4096)).toString("hex")));
    expect(d.root).toBe(rootOf(d.chunks));
  });
});

describe("digest cache", () => {
  test("reuses_the_digest_of_an_unchanged_file_and_rehashes_a_changed_one", async () => {
    const state = join(dir, "state1");
    const p = join(dir, "g.gguf");
    writeFileSync(p, Buffer.alloc(9000, 3));
    const first = await digestOf(state, p, 4096);
    expect(cachedDigest(state, p, 4096)).toEqual(first);
    // Same size, new mtime: the cache no longer vouches for it.
    writeFileSync(p, Buffer.alloc(9000, 4));
    utimesSync(p, new Date(), new Date(Date.now() + 5000));
    expect(cachedDigest(state, p, 4096)).toBeNull();
    const second = await digestOf(state, p, 4096);
    expect(second.hash).not.toBe(first.hash);
  });

  test("keeps_at_most_MAX_CACHED_files", async () => {
    const state = join(dir, "state2");
    const paths: string[] = [];
    for (let i = 0; i < MAX_CACHED + 5; i++) {
      const p = join(dir, `m${i}.gguf`);
      writeFileSync(p, Buffer.from(String(i)));
      paths.push(p);
      rememberDigest(state, p, await hashFile(p, 4096));
    }
    const entries = JSON.parse(readFileSync(join(state, "file-hashes.json"), "utf8")) as unknown[];
    expect(entries.length).toBe(MAX_CACHED);
    expect(cachedDigest(state, paths[0] as string, 4096)).toBeNull();
    expect(cachedDigest(state, paths.at(-1) as string, 4096)).not.toBeNull();
  });

  test("a_damaged_cache_costs_a_rehash_not_a_wrong_digest", async () => {
    const state = join(dir, "state3");
    const p = join(dir, "h.gguf");
    writeFileSync(p, Buffer.alloc(5000, 9));
    const d = await digestOf(state, p, 4096);
    const file = join(state, "file-hashes.json");
    const entries = JSON.parse(readFileSync(file, "utf8")) as Array<{ digest: { chunks: string[] } }>;
    (entries[0] as { digest: { chunks: string[] } }).digest.chunks[0] = "0".repeat(64); // no longer matches its root
    writeFileSync(file, JSON.stringify(entries));
    expect(cachedDigest(state, p, 4096)).toBeNull();
    expect((await digestOf(state, p, 4096)).hash).toBe(d.hash);
  });
});
