import { describe, expect, test } from "bun:test";
import { ModelIndex, pathKey, RoutingIndex } from "../../src/routing/radix";

/** A chain of n hashes named p0..p(n-1) under `tag`, as [hash, parent] pairs. */
const chain = (tag: string, n: number, from = 0): Array<[string, string | null]> =>
  Array.from({ length: n - from }, (_, i) => [`${tag}${i + from}`, i + from === 0 ? null : `${tag}${i + from - 1}`]);
const hashes = (tag: string, n: number) => pathKey(chain(tag, n).map((p) => p[0]));

describe("routing index", () => {
  test("each_holder_matches_its_longest_prefix", () => {
    const m = new ModelIndex();
    m.insertPath("A", chain("p", 5));
    m.insertPath("B", chain("p", 2));
    const got = m.match(hashes("p", 8));
    expect(got).toEqual([
      { holder: "A", depth: 5 },
      { holder: "B", depth: 2 },
    ]);
  });

  test("evictions_leave_no_zombie_tenant", () => {
    const m = new ModelIndex();
    m.insertPath("A", chain("p", 3));
    for (const h of ["p2", "p1", "p0"]) expect(m.evict("A", h)).toBe(true);
    expect(m.match(hashes("p", 3))).toEqual([]);
    expect(m.stats().entries).toBe(0);
    expect(m.stats().bytes).toBe(0);
    expect(m.evict("A", "p0")).toBe(false);
  });

  test("an_entry_stays_while_another_holder_has_it", () => {
    const m = new ModelIndex();
    m.insertPath("A", chain("p", 2));
    m.insertPath("B", chain("p", 2));
    m.evict("A", "p1");
    expect(m.match(hashes("p", 2))).toEqual([
      { holder: "B", depth: 2 },
      { holder: "A", depth: 1 },
    ]);
  });

  test("dropping_a_holder_removes_all_its_tenancy", () => {
    const idx = new RoutingIndex();
    idx.model("m1").insertPath("dead", chain("p", 4));
    idx.model("m2").insertPath("dead", chain("q", 4));
    idx.model("m1").insertPath("live", chain("p", 1));
    expect(idx.dropHolder("dead")).toBe(8);
    expect(idx.model("m1").match(hashes("p", 4))).toEqual([{ holder: "live", depth: 1 }]);
    expect(idx.model("m2").stats().entries).toBe(0);
  });

  test("entries_are_bounded_and_the_tips_of_cold_branches_go_first", () => {
    const m = new ModelIndex({ maxEntriesPerModel: 10, maxBytesPerModel: 1 << 30 });
    m.insertPath("A", chain("old", 6));
    m.insertPath("A", chain("new", 6));
    expect(m.stats().entries).toBe(10);
    expect(m.stats().budgetEvictions).toBe(2);
    // The old branch lost its two deepest blocks, its root is still there.
    expect(m.match(hashes("old", 6))).toEqual([{ holder: "A", depth: 4 }]);
    expect(m.match(hashes("new", 6))).toEqual([{ holder: "A", depth: 6 }]);
  });

  test("bytes_are_bounded_whatever_the_rate", () => {
    const m = new ModelIndex({ maxEntriesPerModel: 1_000_000, maxBytesPerModel: 64 * 1024 });
    for (let i = 0; i < 2000; i++) m.insertPath(`n${i % 7}`, chain(`c${i}-`, 20));
    expect(m.stats().bytes).toBeLessThanOrEqual(64 * 1024);
    expect(m.stats().entries).toBeGreaterThan(0);
  });

  test("a_binary_search_finds_every_holders_depth", () => {
    const m = new ModelIndex();
    const depths = [1, 3, 4, 9, 17, 30, 31];
    depths.forEach((d, i) => {
      m.insertPath(`H${i}`, chain("p", d));
    });
    const got = m.match(hashes("p", 40));
    expect(got.map((x) => x.depth)).toEqual([...depths].reverse());
    expect(got.map((x) => x.holder)).toEqual(depths.map((_, i) => `H${i}`).reverse());
  });

  test("a_match_computes_few_path_hashes", () => {
    const m = new ModelIndex();
    m.insertPath("A", chain("p", 50));
    const asked = new Set<number>();
    const all = chain("p", 64).map((x) => x[0]);
    const hash = (i: number) => {
      asked.add(i);
      return all[i] as string;
    };
    const got = m.match({ length: all.length, hash });
    expect(got).toEqual([{ holder: "A", depth: 50 }]);
    expect(asked.size).toBeLessThanOrEqual(16);
  });

  test("matching_keeps_what_routing_uses", () => {
    const m = new ModelIndex({ maxEntriesPerModel: 6, maxBytesPerModel: 1 << 30 });
    m.insertPath("A", chain("used", 3));
    m.insertPath("A", chain("idle", 3));
    m.match(hashes("used", 3));
    m.insertPath("A", chain("fresh", 3));
    expect(m.match(hashes("used", 3), false)).toEqual([{ holder: "A", depth: 3 }]);
    expect(m.match(hashes("idle", 3), false)).toEqual([]);
  });

  test("a_run_whose_parent_the_holder_lacks_is_reported_dangling", () => {
    const m = new ModelIndex();
    expect(m.insertPath("A", chain("p", 6, 3))).toEqual(["p2"]);
    expect(m.insertPath("A", chain("p", 3))).toEqual([]);
    // Another holder's ancestor does not make the path known for this one.
    expect(m.insertPath("B", chain("p", 6, 4))).toEqual(["p3"]);
  });

  test("an_all_zero_hash_is_an_ordinary_entry", () => {
    const m = new ModelIndex();
    const zero = "AAAAAAAAAAA";
    m.insertPath("A", [[zero, null]]);
    m.insertPath("B", chain("p", 2));
    m.evict("A", zero);
    expect(m.match(hashes("p", 2))).toEqual([{ holder: "B", depth: 2 }]);
  });

  test("models_are_bounded_least_recently_used_first", () => {
    const idx = new RoutingIndex({ maxEntriesPerModel: 10, maxBytesPerModel: 1 << 20, maxModels: 3 });
    for (const name of ["a", "b", "c"]) idx.model(name).insertPath("A", chain("p", 1));
    idx.model("a");
    idx.model("d");
    expect(Object.keys(idx.stats().models).sort()).toEqual(["a", "c", "d"]);
    expect(idx.stats().modelsDropped).toBe(1);
  });

  test("the_same_hash_under_two_models_stays_apart", () => {
    const idx = new RoutingIndex();
    idx.model("m1").insertPath("A", chain("p", 2));
    expect(idx.model("m2").match(hashes("p", 2))).toEqual([]);
  });
});

describe("routing index summary", () => {
  test("counts_prefixes_by_length_age_and_holder_and_lists_the_most_recent_as_hashes", () => {
    const m = new ModelIndex();
    const chain = Array.from({ length: 20 }, (_, i) => [`h${i}`, i === 0 ? null : `h${i - 1}`] as const);
    m.insertPath("a", chain);
    m.insertPath("b", chain.slice(0, 3));
    const s = m.summary(5, Date.now() + 30_000);
    expect(s.entries).toBe(20);
    // 1 | 2-3 | 4-7 | 8-15 | 16+ blocks
    expect(s.byDepth).toEqual([1, 2, 4, 8, 5]);
    // all learnt 30 s "ago": between 10 s and 1 min
    expect(s.byAge).toEqual([0, 20, 0, 0]);
    expect(s.byHolder).toEqual({ a: 20, b: 3 });
    expect(s.recent).toHaveLength(5);
    // insertPath touches leaf first, so the root is the most recently used
    expect(s.recent[0]).toMatchObject({ hash: "h0", depth: 1 });
    expect(s.recent[0]?.holders.sort()).toEqual(["a", "b"]);
  });
});
