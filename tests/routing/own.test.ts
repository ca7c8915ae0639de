import { describe, expect, test } from "bun:test";
import { hashFromBytes } from "../../src/routing/key";
import { isModelName, OwnTenancy } from "../../src/routing/own";

let counter = 0;
/** A fresh, distinct path hash. */
function h(): string {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setUint32(0, ++counter);
  return hashFromBytes(b, 0);
}

function chain(n: number, parent: string | null = null): Array<[string, string | null]> {
  const out: Array<[string, string | null]> = [];
  for (let i = 0; i < n; i++) {
    const x = h();
    out.push([x, parent]);
    parent = x;
  }
  return out;
}

/** Whether every pair's held parent comes before it. */
function parentsFirst(pairs: Array<[string, string | null]>): boolean {
  const seen = new Set<string>();
  const all = new Set(pairs.map(([x]) => x));
  for (const [x, p] of pairs) {
    if (p !== null && all.has(p) && !seen.has(p)) return false;
    seen.add(x);
  }
  return true;
}

describe("own tenancy", () => {
  test("inserts_past_the_per_model_bound_are_refused_and_counted", () => {
    const own = new OwnTenancy({ maxHashesPerModel: 100 });
    const c = chain(150);
    const r = own.apply("m", { inserts: c, evicts: [] });
    expect(r).toEqual({ inserted: 100, evicted: 0, refused: 50 });
    expect(own.size("m")).toBe(100);
    expect(own.stats()).toMatchObject({ hashes: 100, refused: 50 });
    // Room made by evictions is usable again.
    own.apply("m", { inserts: [], evicts: c.slice(0, 10).map(([x]) => x) });
    expect(own.apply("m", { inserts: chain(20), evicts: [] }).inserted).toBe(10);
    expect(own.size("m")).toBe(100);
  });

  test("models_past_the_bound_and_malformed_input_are_refused", () => {
    const own = new OwnTenancy({ maxModels: 2 });
    expect(own.apply("m1", { inserts: chain(1), evicts: [] }).inserted).toBe(1);
    expect(own.apply("m2", { inserts: chain(1), evicts: [] }).inserted).toBe(1);
    expect(own.apply("m3", { inserts: chain(3), evicts: [] })).toEqual({ inserted: 0, evicted: 0, refused: 3 });
    expect(
      own.apply("m1", {
        inserts: [
          ["not a hash", null],
          [h(), "bad parent"],
        ],
        evicts: [],
      }).refused,
    ).toBe(2);
    expect(own.stats()).toMatchObject({ models: 2, modelsRefused: 1 });
    expect(isModelName("qwen2.5-7b-instruct/q4_k_m:latest")).toBe(true);
    for (const bad of ["", "has space", "x".repeat(129), "caf\u00e9", 7]) expect(isModelName(bad)).toBe(false);
  });

  test("a_model_emptied_by_evictions_is_forgotten", () => {
    const own = new OwnTenancy();
    const c = chain(3);
    own.apply("m", { inserts: c, evicts: [] });
    own.apply("m", { inserts: [], evicts: c.map(([x]) => x) });
    expect(own.models()).toEqual([]);
    expect(own.stats().hashes).toBe(0);
  });

  test("a_cursor_yields_parents_before_children_even_after_a_parent_is_reinserted", () => {
    const own = new OwnTenancy();
    const c = chain(5);
    own.apply("m", { inserts: c, evicts: [] });
    const [p1] = c[1] as [string, string];
    // The engine dropped block 1 and loaded it again: it is now newer than its children.
    own.apply("m", { inserts: [], evicts: [p1] });
    own.apply("m", { inserts: [c[1] as [string, string]], evicts: [] });
    const out = own.entries("m");
    expect(parentsFirst(out)).toBe(true);
    expect(new Set(out.map(([x]) => x))).toEqual(new Set(c.map(([x]) => x)));
  });

  test("a_cursor_yields_what_was_held_when_it_began_and_is_still_held_when_reached", () => {
    const own = new OwnTenancy();
    const c = chain(10);
    own.apply("m", { inserts: c, evicts: [] });
    const cur = own.cursor("m");
    const got: string[] = [];
    for (let i = 0; i < 3; i++) {
      got.push((cur.peek() as [string, string | null])[0]);
      cur.take();
    }
    const later = chain(2, (c[9] as [string, string])[0]);
    own.apply("m", { inserts: later, evicts: [(c[6] as [string, string])[0]] });
    for (let e = cur.peek(); e !== null; e = cur.peek()) {
      got.push(e[0]);
      cur.take();
    }
    expect(got).not.toContain((c[6] as [string, string])[0]);
    // What was added after it began is not its to yield: the sync queues those changes for the peer itself.
    expect(got).toEqual(c.filter((_, i) => i !== 6).map(([x]) => x));
    expect(cur.finished).toBe(true);
  });

  test("a_cursor_over_a_dropped_model_turns_stale_and_yields_nothing_more", () => {
    const own = new OwnTenancy();
    own.apply("m", { inserts: chain(5), evicts: [] });
    const cur = own.cursor("m");
    expect(cur.peek()).not.toBeNull();
    own.dropModel("m");
    own.apply("m", { inserts: chain(2), evicts: [] });
    expect(cur.stale).toBe(true);
    // Not even the pair it had looked at: it belongs to the dropped tenancy.
    expect(cur.peek()).toBeNull();
    expect(own.cursor("m").finished).toBe(false);
    // Emptied by evictions (each one a change peers hear of) is not dropped: the cursor just ends.
    const c2 = own.cursor("m");
    own.apply("m", { inserts: [], evicts: own.entries("m").map(([x]) => x) });
    own.apply("m", { inserts: chain(1), evicts: [] });
    expect(c2.stale).toBe(false);
    expect(c2.peek()).toBeNull();
  });

  test("path_to_walks_parent_links_root_first_and_is_bounded", () => {
    const own = new OwnTenancy();
    const c = chain(8);
    own.apply("m", { inserts: c, evicts: [] });
    const tip = (c[7] as [string, string])[0];
    expect(own.pathTo("m", tip, 100)).toEqual(c);
    expect(own.pathTo("m", tip, 3)).toEqual(c.slice(5));
    expect(own.pathTo("m", h(), 100)).toEqual([]);
    expect(own.pathTo("other", tip, 100)).toEqual([]);
    // A hole in the chain cuts the path there, keeping the real parent link.
    own.apply("m", { inserts: [], evicts: [(c[3] as [string, string])[0]] });
    expect(own.pathTo("m", tip, 100)).toEqual(c.slice(4));
  });
});
