// The holder's routes: a chunk's exact bytes whether capped or not, the
// manifest, and 404 for anything it does not announce.
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { hashFile } from "../../../src/hydration/files/hash";
import { Shelf } from "../../../src/hydration/files/upload";

const dir = mkdtempSync(join(tmpdir(), "mesh-shelf-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function shelfWith(o: { uploadLimit: number; corruptUploads?: boolean }) {
  const path = join(dir, "m.gguf");
  writeFileSync(path, Buffer.from(Array.from({ length: 10_000 }, (_, i) => i % 251)));
  const d = await hashFile(path, 4096);
  const shelf = new Shelf(o);
  shelf.add({
    path,
    announce: { name: "m", aliases: [], file: "m.gguf", size: d.size, hash: d.hash, chunkSize: 4096, root: d.root },
    manifest: { hash: d.hash, size: d.size, chunkSize: 4096, chunks: d.chunks },
  });
  return { shelf, d, bytes: readFileSync(path) };
}

describe("Shelf", () => {
  for (const uploadLimit of [0, 1 << 30]) {
    test(`serves_each_chunk_exactly_${uploadLimit === 0 ? "uncapped" : "under_a_cap"}`, async () => {
      const { shelf, d, bytes } = await shelfWith({ uploadLimit });
      for (const [i, start, end] of [
        [0, 0, 4096],
        [2, 8192, 10_000],
      ] as const) {
        const r = await shelf.handle(`/mesh/files/${d.hash}/chunks/${i}`);
        expect(r.status).toBe(200);
        expect(Buffer.from(await r.arrayBuffer()).equals(bytes.subarray(start, end))).toBe(true);
      }
      const m = (await (await shelf.handle(`/mesh/files/${d.hash}/manifest`)).json()) as { chunks: string[] };
      expect(m.chunks).toEqual(d.chunks);
      expect(shelf.stats.chunksServed).toBe(2);
    });
  }

  test("answers_404_for_what_it_does_not_announce", async () => {
    const { shelf, d } = await shelfWith({ uploadLimit: 0 });
    for (const p of [
      `/mesh/files/${"1".repeat(64)}/manifest`,
      `/mesh/files/${d.hash}/chunks/3`,
      `/mesh/files/${d.hash}/chunks/-1`,
      "/mesh/files/../../etc/passwd",
      `/mesh/files/${d.hash}/../node.key`,
    ]) {
      expect((await shelf.handle(p)).status).toBe(404);
    }
    expect(shelf.stats.notFound).toBe(5);
  });

  test("the_test_fault_flips_a_byte_of_every_chunk", async () => {
    const { shelf, d, bytes } = await shelfWith({ uploadLimit: 0, corruptUploads: true });
    const got = Buffer.from(await (await shelf.handle(`/mesh/files/${d.hash}/chunks/0`)).arrayBuffer());
    expect(got.length).toBe(4096);
    expect(got.equals(bytes.subarray(0, 4096))).toBe(false);
    expect(shelf.stats.corrupted).toBe(1);
  });
});
