import { afterEach, describe, expect, test } from "bun:test";
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CheckpointStore } from "../../src/engine/checkpoints";
import { collect, Engine, type EngineOptions } from "../../src/engine/index";
import { tinyModel } from "../helpers/model";

const dirs: string[] = [];
const tempDir = () => {
  const d = mkdtempSync(join(tmpdir(), "mesh-ckpt-"));
  dirs.push(d);
  return d;
};
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

const state = (n: number, fill: number) => new Uint8Array(n).fill(fill);
const store = (o: Partial<ConstructorParameters<typeof CheckpointStore>[0]> = {}) =>
  new CheckpointStore({ ramBytes: 1000, diskBytes: 0, dir: null, fingerprint: "fp", maxEntries: 16, ...o });

describe("checkpoint store", () => {
  test("past_the_ram_budget_the_least_recently_used_spill_to_disk_and_load_back_intact", () => {
    const dir = tempDir();
    const s = store({ ramBytes: 250, diskBytes: 10_000, dir });
    for (let i = 0; i < 4; i++) expect(s.put(`k${i}`, [i, i + 1], state(100, i))?.key).toBe(`k${i}`);
    const st = s.stats();
    expect(st.checkpoints).toBe(4);
    expect(st.checkpointRamBytes).toBeLessThanOrEqual(250);
    expect(st.checkpointDiskBytes).toBe(200);
    const found = s.find("k0", [0, 1, 7]);
    expect(found?.lcp).toBe(2);
    expect(Array.from(s.load(found?.entry as NonNullable<typeof found>["entry"]) ?? [])).toEqual(Array(100).fill(0));
  });

  test("past_the_disk_budget_the_coldest_spilled_checkpoint_is_dropped_and_its_file_removed", () => {
    const dir = tempDir();
    const s = store({ ramBytes: 100, diskBytes: 200, dir });
    for (let i = 0; i < 5; i++) s.put(`k${i}`, [i], state(100, i));
    const st = s.stats();
    expect(st.checkpointRamBytes).toBeLessThanOrEqual(100);
    expect(st.checkpointDiskBytes).toBeLessThanOrEqual(200);
    expect(st.checkpoints).toBe(3);
    expect(s.find("k0", [0])).toBeNull();
    expect(readdirSync(join(dir, "fp")).length).toBe(2);
  });

  test("without_a_disk_the_ram_budget_drops_the_least_recently_used", () => {
    const s = store({ ramBytes: 250 });
    for (let i = 0; i < 4; i++) s.put(`k${i}`, [i], state(100, i));
    expect(s.stats()).toMatchObject({ checkpoints: 2, checkpointRamBytes: 200, checkpointDrops: 2 });
    expect(s.find("k3", [3])?.entry.key).toBe("k3");
  });

  test("released_checkpoints_leave_ram_and_disk_and_are_reported_dropped_once", () => {
    const dir = tempDir();
    const s = store({ ramBytes: 0, diskBytes: 1000, dir });
    const dropped: string[] = [];
    s.onDrop = (e) => dropped.push(e.key);
    s.put("a", [1], state(10, 1));
    expect(readdirSync(join(dir, "fp"))).toEqual(["a.ckpt"]);
    s.release(["a", "unknown"]);
    s.release(["a"]);
    expect(dropped).toEqual(["a"]);
    expect(s.stats().checkpoints).toBe(0);
    expect(readdirSync(join(dir, "fp"))).toEqual([]);
  });

  test("a_restart_finds_spilled_checkpoints_and_ignores_other_models_and_damaged_files", () => {
    const dir = tempDir();
    const first = store({ ramBytes: 0, diskBytes: 1000, dir });
    first.put("keep", [5, 6, 7], state(40, 9));
    first.clearRam();
    const other = store({ ramBytes: 0, diskBytes: 1000, dir, fingerprint: "other" });
    other.put("theirs", [5, 6, 7], state(40, 1));
    writeFileSync(join(dir, "fp", "junk.ckpt"), "not a checkpoint");
    const again = store({ ramBytes: 0, diskBytes: 1000, dir });
    expect(again.stats().checkpoints).toBe(1);
    // Found by its tokens alone: the session that named it is gone after a restart.
    const f = again.find(undefined, [5, 6, 7, 8]);
    expect(f?.entry.key).toBe("keep");
    expect(f?.lcp).toBe(3);
    expect(Array.from(again.load(f?.entry as NonNullable<typeof f>["entry"]) ?? [])).toEqual(Array(40).fill(9));
    expect(readdirSync(join(dir, "fp")).sort()).toEqual(["keep.ckpt"]);
  });

  test("keys_that_are_not_plain_identifiers_are_refused", () => {
    const s = store();
    expect(s.put("../escape", [1], state(1, 1))).toBeNull();
    expect(s.put("", [1], state(1, 1))).toBeNull();
    expect(s.stats().checkpoints).toBe(0);
  });

  test("past_the_entry_bound_the_coldest_is_dropped", () => {
    const s = store({ ramBytes: 1 << 20, maxEntries: 3 });
    for (let i = 0; i < 5; i++) s.put(`k${i}`, [i], state(1, 1));
    expect(s.stats().checkpoints).toBe(3);
    expect(s.find("k0", [0])).toBeNull();
  });
});

function tokens(seed: number, n: number): number[] {
  let x = seed * 7919 + 13;
  return Array.from({ length: n }, () => {
    x = (x * 1103515245 + 12345) % 2147483648;
    return 100 + (x % 20000);
  });
}

async function withEngine(o: Partial<EngineOptions>, fn: (e: Engine) => Promise<void>): Promise<void> {
  // Host tier off and one slot: only a checkpoint can bring a replaced conversation back.
  const e = await Engine.load({ modelPath: await tinyModel(), threads: 2, nCtx: 2048, nParallel: 1, hostCacheMiB: 0, ...o });
  try {
    await fn(e);
  } finally {
    await e.close();
  }
}

const run = (e: Engine, prompt: number[], checkpoint?: { save?: string; restore?: string }, maxTokens = 8) =>
  collect(e.generate({ prompt, maxTokens, sampling: { temperature: 0 }, ignoreEos: true, ...(checkpoint ? { checkpoint } : {}) }));

describe("engine with session checkpoints", () => {
  const turn1 = tokens(11, 400);
  let expected: number[] = [];

  test("a_checkpoint_is_restored_after_its_slot_was_taken_and_decodes_like_a_full_prefill", async () => {
    let follow: number[] = [];
    // Reference: no checkpoints, the second turn is prefilled in full.
    await withEngine({ checkpointRamMiB: 0 }, async (e) => {
      const r1 = await run(e, turn1);
      follow = [...turn1, ...r1.tokens, ...tokens(12, 20)];
      await run(e, tokens(13, 300));
      const r = await run(e, follow, undefined, 16);
      expect(r.done.cachedTokens).toBe(0);
      expected = r.tokens;
    });
    await withEngine({}, async (e) => {
      await run(e, turn1, { save: "turn1" });
      await run(e, tokens(13, 300));
      const before = await e.stats();
      expect(before.checkpointSaves).toBe(1);
      const r = await run(e, follow, { restore: "turn1" }, 16);
      const after = await e.stats();
      expect(after.checkpointRestores).toBe(1);
      // The prompt and all but the last reply token were in the KV the turn left.
      expect(r.done.cachedTokens).toBe(turn1.length + 7);
      expect(r.tokens).toEqual(expected);
      // Released: the next time it is prefilled again, with the same output.
      e.releaseCheckpoints(["turn1"]);
      await run(e, tokens(14, 300));
      const again = await run(e, follow, { restore: "turn1" }, 16);
      expect(again.done.cachedTokens).toBe(0);
      expect(again.tokens).toEqual(expected);
      expect((await e.stats()).checkpoints).toBe(0);
    });
  });

  test("checkpoints_spilled_to_disk_are_used_after_a_restart", async () => {
    const dir = tempDir();
    const follow = [...turn1, ...tokens(15, 30)];
    let reference: number[] = [];
    await withEngine({ checkpointRamMiB: 0 }, async (e) => {
      reference = (await run(e, follow, undefined, 16)).tokens;
    });
    // No RAM budget: every checkpoint goes straight to disk.
    await withEngine({ checkpointRamMiB: 0, checkpointDiskMiB: 64, checkpointDir: dir }, async (e) => {
      await run(e, turn1, { save: "before_restart" });
      expect((await e.stats()).checkpointDiskBytes).toBeGreaterThan(0);
    });
    await withEngine({ checkpointRamMiB: 0, checkpointDiskMiB: 64, checkpointDir: dir }, async (e) => {
      expect((await e.stats()).checkpoints).toBe(1);
      // The session that named it is gone: found by its tokens.
      const r = await run(e, follow, undefined, 16);
      expect((await e.stats()).checkpointRestores).toBe(1);
      expect(r.done.cachedTokens).toBe(turn1.length);
      expect(r.tokens).toEqual(reference);
    });
  });
});
