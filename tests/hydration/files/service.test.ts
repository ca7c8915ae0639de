// The node's file service without a mesh: bounded bookkeeping, nothing to find.
import { describe, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { newPullStats } from "../../../src/hydration/files/download";
import { hashFile, rememberDigest } from "../../../src/hydration/files/hash";
import { FileService } from "../../../src/hydration/files/service";
import { silentLogger } from "../../../src/log";

const unused = {
  manifest: async () => {
    throw new Error("not asked");
  },
  chunk: async () => {
    throw new Error("not asked");
  },
};

describe("FileService", () => {
  test("keeps_at_most_64_local_rows", () => {
    const s = new FileService({
      selfId: "n",
      stateDir: "/nonexistent",
      uploadLimit: 0,
      chunkSize: 4096,
      fetcher: unused,
      log: silentLogger,
    });
    for (let i = 0; i < 100; i++) s.waiting(`m${i}`, `/x/m${i}.gguf`);
    const local = s.report().local;
    expect(local.length).toBe(64);
    expect(local.at(-1)?.name).toBe("m99");
    expect(local[0]?.name).toBe("m36");
  });

  test("finds_nothing_before_it_joins_and_renders_metrics", () => {
    const s = new FileService({
      selfId: "n",
      stateDir: "/nonexistent",
      uploadLimit: 0,
      chunkSize: 4096,
      fetcher: unused,
      log: silentLogger,
    });
    expect(s.find("anything")).toBeNull();
    expect(s.meshFiles()).toEqual([]);
    expect(s.metrics()).toContain("mesh_files_pull_chunks_corrupt_total 0");
    expect(newPullStats().completed).toBe(0);
  });

  test("a_file_pulled_before_under_another_name_is_used_without_asking_anyone", async () => {
    const dir = mkdtempSync(join(tmpdir(), "mesh-svc-"));
    const dest = join(dir, "models", "qwen.gguf");
    mkdirSync(join(dir, "models"));
    writeFileSync(dest, Buffer.alloc(9000, 5));
    const d = await hashFile(dest, 4096);
    rememberDigest(dir, dest, d);
    const s = new FileService({ selfId: "n", stateDir: dir, uploadLimit: 0, chunkSize: 4096, fetcher: unused, log: silentLogger });
    const a = { name: "qwen", aliases: ["gpt-4o"], file: "qwen.gguf", size: d.size, hash: d.hash, chunkSize: 4096, root: d.root };
    const r = await s.hydrate(a, dest);
    expect(r.ok).toBe(true);
    expect(s.stats.bytesFetched).toBe(0);
  });

  test("the_row_that_waited_under_an_alias_is_replaced_by_the_pull_not_left_waiting", async () => {
    const dir = mkdtempSync(join(tmpdir(), "mesh-svc-"));
    const dest = join(dir, "models", "qwen.gguf");
    mkdirSync(join(dir, "models"));
    writeFileSync(dest, Buffer.alloc(9000, 5));
    const d = await hashFile(dest, 4096);
    rememberDigest(dir, dest, d);
    const s = new FileService({ selfId: "n", stateDir: dir, uploadLimit: 0, chunkSize: 4096, fetcher: unused, log: silentLogger });
    // `mesh serve --model gpt-4o`: it waits under the name asked for, then pulls the file that answers to it.
    s.waiting("gpt-4o", join(dir, "models", "gpt-4o.gguf"));
    s.waiting("other", join(dir, "models", "other.gguf"));
    const a = { name: "qwen", aliases: ["gpt-4o"], file: "qwen.gguf", size: d.size, hash: d.hash, chunkSize: 4096, root: d.root };
    expect((await s.hydrate(a, dest)).ok).toBe(true);
    expect(s.report().local.map((r) => [r.name, r.state])).toEqual([
      ["other", "waiting"],
      ["qwen", "announced"],
    ]);
  });

  test("a_file_name_peers_would_refuse_is_not_announced_and_says_why", async () => {
    const s = new FileService({
      selfId: "n",
      stateDir: "/nonexistent",
      uploadLimit: 0,
      chunkSize: 4096,
      fetcher: unused,
      log: silentLogger,
    });
    expect(await s.offer("/models/my model.gguf", "my model", [])).toBeNull();
    expect(s.report().local[0]).toMatchObject({ state: "failed" });
    expect(s.shelf.list()).toEqual([]);
  });
});
