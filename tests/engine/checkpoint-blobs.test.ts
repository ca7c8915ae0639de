// Checkpoints moving between nodes as blobs: exported with the holder's portable fingerprint and hash,
// imported only when both check out. Pure (no native code): the state bytes are opaque to the store.
import { describe, expect, test } from "bun:test";
import { CheckpointStore, checkpointHash } from "../../src/engine/checkpoints";

const store = (portable = "model-a") =>
  new CheckpointStore({ ramBytes: 10_000, diskBytes: 0, dir: null, fingerprint: `local-${portable}`, portable, maxEntries: 16 });
const state = (n: number) => Uint8Array.from({ length: n }, (_, i) => (i * 7) & 0xff);

function exported() {
  const holder = store();
  holder.put("k1", [5, 6, 7, 8], state(300));
  const [summary] = holder.describe(["k1", "missing"]);
  const blob = holder.exportBlob("k1");
  if (!summary || !blob) throw new Error("export failed");
  return { summary, blob };
}

describe("checkpoint blobs", () => {
  test("a_blob_imported_on_another_store_of_the_same_model_is_found_for_its_prompt", () => {
    const { summary, blob } = exported();
    expect(summary).toEqual({ key: "k1", hash: checkpointHash(Int32Array.from([5, 6, 7, 8]), state(300)), tokens: 4, bytes: 300 });
    const here = store();
    expect(here.importBlob(blob, summary.hash, "k1")).toEqual({ ok: true, key: "k1", tokens: 4 });
    const found = here.find(undefined, [5, 6, 7, 8, 9]);
    expect(found?.lcp).toBe(4);
    expect(Array.from(here.load(found?.entry as NonNullable<typeof found>["entry"]) ?? [])).toEqual(Array.from(state(300)));
    expect(here.has(["k1", "k2"])).toEqual(["k1"]);
  });

  test("a_blob_with_a_flipped_byte_is_refused_as_corrupt_and_stores_nothing", () => {
    const { summary, blob } = exported();
    const bad = blob.slice();
    bad[bad.length - 10] = (bad[bad.length - 10] as number) ^ 0xff;
    const here = store();
    expect(here.importBlob(bad, summary.hash, "k1")).toEqual({ ok: false, code: "corrupt" });
    expect(here.stats().checkpoints).toBe(0);
  });

  test("a_truncated_or_garbage_blob_is_refused_as_corrupt", () => {
    const { summary, blob } = exported();
    const here = store();
    expect(here.importBlob(blob.slice(0, blob.length - 1), summary.hash, "k1")).toEqual({ ok: false, code: "corrupt" });
    expect(here.importBlob(new Uint8Array(64), summary.hash, "k1")).toEqual({ ok: false, code: "corrupt" });
    expect(here.importBlob(blob, "0".repeat(64), "k1")).toEqual({ ok: false, code: "corrupt" });
    expect(here.stats().checkpoints).toBe(0);
  });

  test("a_blob_made_for_another_model_or_context_is_refused_as_incompatible", () => {
    const { summary, blob } = exported();
    const other = store("model-b");
    expect(other.importBlob(blob, summary.hash, "k1")).toEqual({ ok: false, code: "incompatible" });
    expect(other.stats().checkpoints).toBe(0);
  });

  test("describing_a_checkpoint_does_not_make_it_recently_used", () => {
    const s = new CheckpointStore({ ramBytes: 250, diskBytes: 0, dir: null, fingerprint: "f", portable: "p", maxEntries: 16 });
    s.put("old", [1], state(100));
    s.put("new", [2], state(100));
    s.describe(["old"]);
    s.exportBlob("old");
    // Past the RAM budget (no disk): the least recently used goes, and announcing or serving it was no use.
    s.put("third", [3], state(100));
    expect(s.has(["old", "new", "third"])).toEqual(["new", "third"]);
  });
});

describe("checkpoint blobs: regressions", () => {
  test("a_blob_whose_header_names_another_key_than_announced_is_corrupt_and_replaces_nothing", () => {
    // The hash covers tokens and state, not the key: a blob of key "victim" passed off under "k1" must not land under "victim".
    const holder = store();
    holder.put("victim", [1, 2, 3], state(50));
    const [summary] = holder.describe(["victim"]);
    const blob = holder.exportBlob("victim");
    if (!summary || !blob) throw new Error("export failed");
    const here = store();
    here.put("victim", [7, 7, 7], state(40));
    expect(here.importBlob(blob, summary.hash, "k1")).toEqual({ ok: false, code: "corrupt" });
    expect(here.stats().checkpoints).toBe(1);
    expect(here.find("victim", [7, 7, 7])?.lcp).toBe(3);
  });
});
