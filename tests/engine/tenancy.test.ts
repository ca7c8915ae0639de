// The KV tenancy bookkeeping on its own: which prefix marks are held, and
// what a drain reports. No native code.
import { describe, expect, test } from "bun:test";
import type { TenancyDelta } from "../../src/engine/protocol";
import { MAX_MARKS, Tenancy, TenancyFeed, type TokenMark, tokenMarks } from "../../src/engine/tenancy";

const mark = (hash: string, tokenEnd: number, parent: string | null = null): TokenMark => ({ hash, parent, tokenEnd });
const chain = (...ends: number[]): TokenMark[] => ends.map((e, i) => mark(`m${i}`, e, i === 0 ? null : `m${i - 1}`));

describe("tenancy bookkeeping", () => {
  test("marks_are_held_only_once_the_history_reaches_their_token_end", () => {
    const t = new Tenancy<string>();
    t.hold("slot", 0, chain(10, 20, 30));
    expect(t.drain()).toBeNull();
    t.hold("slot", 15);
    expect(t.drain()).toEqual({ inserts: [["m0", null]], evicts: [] });
    t.hold("slot", 30);
    expect(t.drain()).toEqual({
      inserts: [
        ["m1", "m0"],
        ["m2", "m1"],
      ],
      evicts: [],
    });
    expect(t.waiting("slot")).toBe(false);
  });

  test("a_reused_slot_trimmed_below_a_mark_evicts_it", () => {
    const t = new Tenancy<string>();
    t.hold("slot", 30, chain(10, 20, 30));
    t.drain();
    t.trim("slot", 19);
    expect(t.drain()).toEqual({ inserts: [], evicts: ["m2", "m1"] });
    expect(t.holds("m0")).toBe(true);
    // Growing back past the old ends does not bring trimmed marks back: they belonged to the old prompt.
    t.hold("slot", 40);
    expect(t.drain()).toBeNull();
  });

  test("trimming_drops_marks_not_yet_held_so_a_different_continuation_never_claims_them", () => {
    const t = new Tenancy<string>();
    t.hold("slot", 5, chain(10, 20));
    t.trim("slot", 5);
    t.hold("slot", 25);
    expect(t.drain()).toBeNull();
    expect(t.active).toBe(false);
  });

  test("insert_then_evict_in_one_interval_reports_nothing", () => {
    const t = new Tenancy<string>();
    t.hold("a", 10, chain(10));
    t.release("a");
    expect(t.drain()).toBeNull();
  });

  test("evict_then_insert_again_in_one_interval_reports_nothing", () => {
    const t = new Tenancy<string>();
    t.hold("a", 10, chain(10));
    t.drain();
    t.release("a");
    t.hold("b", 10, chain(10));
    expect(t.drain()).toBeNull();
    t.release("b");
    expect(t.drain()).toEqual({ inserts: [], evicts: ["m0"] });
  });

  test("a_mark_two_holders_share_is_evicted_only_when_the_last_one_drops_it", () => {
    const t = new Tenancy<string>();
    t.hold("slot", 20, chain(10, 20));
    t.hold("entry", 20, t.marks("slot"));
    expect(t.drain()?.inserts).toHaveLength(2);
    t.release("slot");
    expect(t.drain()).toBeNull();
    t.trim("entry", 10);
    expect(t.drain()).toEqual({ inserts: [], evicts: ["m1"] });
    t.release("entry");
    expect(t.drain()).toEqual({ inserts: [], evicts: ["m0"] });
    expect(t.heldCount).toBe(0);
  });

  test("the_same_hash_attached_twice_to_one_holder_counts_once", () => {
    const t = new Tenancy<string>();
    t.hold("slot", 10, [mark("x", 10)]);
    t.hold("slot", 10, [mark("x", 10), mark("x", 5)]);
    t.drain();
    t.release("slot");
    expect(t.drain()).toEqual({ inserts: [], evicts: ["x"] });
  });

  test("inserts_are_reported_parent_before_child_whatever_order_they_were_held_in", () => {
    const t = new Tenancy<string>();
    t.hold("b", 10, [mark("child", 10, "parent")]);
    t.hold("a", 10, [mark("parent", 5, "root"), mark("root", 1)]);
    const d = t.drain() as TenancyDelta;
    expect(d.inserts.map(([h]) => h)).toEqual(["root", "parent", "child"]);
    expect(d.inserts).toContainEqual(["child", "parent"]);
  });

  test("a_cycle_in_parents_cannot_loop_the_drain", () => {
    const t = new Tenancy<string>();
    t.hold("a", 10, [mark("x", 5, "y"), mark("y", 6, "x")]);
    expect(
      t
        .drain()
        ?.inserts.map(([h]) => h)
        .sort(),
    ).toEqual(["x", "y"]);
  });

  test("requests_without_marks_report_nothing", () => {
    const t = new Tenancy<string>();
    t.hold("slot", 100);
    t.trim("slot", 0);
    t.release("slot");
    expect(t.active).toBe(false);
    expect(t.drain()).toBeNull();
  });

  test("a_hold_that_covers_waiting_marks_and_adds_new_ones_counts_each_mark_once", () => {
    // Review finding: the new mark was counted held twice and the waiting one never, so after a
    // release the new one stayed held forever (a false claim) and the old one was never reported.
    const t = new Tenancy<string>();
    t.hold("s", 0, [mark("A", 10)]);
    t.hold("s", 20, [mark("B", 15, "A"), mark("C", 5)]);
    expect(t.drain()?.inserts.map(([h]) => h)).toEqual(["C", "A", "B"]);
    expect(t.marks("s").map((m) => m.hash)).toEqual(["C", "A", "B"]);
    t.release("s");
    expect(t.heldCount).toBe(0);
    expect(t.drain()?.evicts.sort()).toEqual(["A", "B", "C"]);
  });

  test("clear_forgets_every_holder_and_reports_each_held_mark_evicted_once", () => {
    const t = new Tenancy<string>();
    t.hold("slot", 20, chain(10, 20));
    t.hold("entry", 20, t.marks("slot"));
    t.hold("waiting", 5, [mark("w", 50)]);
    t.drain();
    // Held since the last drain and gone again at the clear: never reported either way.
    t.hold("new", 5, [mark("n", 5)]);
    t.clear();
    expect(t.active).toBe(false);
    expect(t.heldCount).toBe(0);
    expect(t.marks("slot")).toEqual([]);
    expect(t.drain()).toEqual({ inserts: [], evicts: ["m0", "m1"] });
    // The holders' tokens are still there, but the waiting mark is gone with the rest.
    t.hold("waiting", 60);
    t.hold("slot", 30);
    expect(t.drain()).toBeNull();
    // New marks after the clear are reported as usual.
    t.hold("slot", 30, [mark("m0", 10)]);
    expect(t.drain()).toEqual({ inserts: [["m0", null]], evicts: [] });
  });

  test("a_holder_holds_a_mark_only_once_its_tokens_reach_it", () => {
    const t = new Tenancy<string>();
    t.hold("s", 10, chain(10, 20));
    expect(t.heldBy("s", "m0")).toBe(true);
    expect(t.heldBy("s", "m1")).toBe(false);
    expect(t.heldBy("other", "m0")).toBe(false);
    expect(t.heldBy("s", "m0", 9)).toBe(false);
  });

  test("refcounts_match_a_recount_after_any_sequence_of_operations", () => {
    // A brute-force model: each holder's marks and length; held = attached and tokenEnd <= length.
    // hold() comes in every shape the engine uses: marks waiting on a short history, a history that
    // grows over waiting marks (prefill), both at once, and a shorter length that trims first.
    for (const start of [7, 11, 42, 1234, 99991]) {
      let seed = start;
      const rnd = (n: number) => {
        seed = (seed * 1103515245 + 12345) % 2147483648;
        return seed % n;
      };
      const t = new Tenancy<number>();
      const model = new Map<number, { length: number; marks: Map<string, number> }>();
      const reported = new Set<string>();
      const heldNow = () => {
        const s = new Set<string>();
        for (const h of model.values()) for (const [hash, end] of h.marks) if (end <= h.length) s.add(hash);
        return s;
      };
      const drainAndCheck = () => {
        const d = t.drain();
        for (const [hash] of d?.inserts ?? []) {
          expect(reported.has(hash)).toBe(false);
          reported.add(hash);
        }
        for (const hash of d?.evicts ?? []) {
          expect(reported.has(hash)).toBe(true);
          reported.delete(hash);
        }
        expect([...reported].sort()).toEqual([...heldNow()].sort());
      };
      for (let step = 0; step < 5000; step++) {
        const holder = rnd(5);
        const h = model.get(holder) ?? { length: 0, marks: new Map() };
        const op = rnd(5);
        if (op === 0 || op === 4) {
          // op 4: a jump past the holder's waiting marks, often with new marks at once.
          const length = op === 4 ? h.length + rnd(80) : rnd(3) === 0 ? rnd(h.length + 1) : h.length + rnd(20);
          const marks = Array.from({ length: rnd(op === 4 ? 4 : 3) }, () => mark(`h${rnd(12)}`, 1 + rnd(60)));
          t.hold(holder, length, marks);
          if (length < h.length) for (const [hash, end] of h.marks) if (end > length) h.marks.delete(hash);
          for (const m of marks) {
            const old = h.marks.get(m.hash);
            if (old === undefined || m.tokenEnd < old) h.marks.set(m.hash, m.tokenEnd);
          }
          h.length = length;
          if (h.marks.size === 0) h.length = 0;
        } else if (op === 1) {
          const keep = rnd(h.length + 1);
          t.trim(holder, keep);
          for (const [hash, end] of h.marks) if (end > keep) h.marks.delete(hash);
          h.length = Math.min(h.length, keep);
          if (h.marks.size === 0) h.length = 0;
        } else if (op === 2) {
          t.release(holder);
          h.marks.clear();
          h.length = 0;
        } else drainAndCheck();
        model.set(holder, h);
        for (const hash of heldNow()) expect(t.holds(hash)).toBe(true);
        expect(t.heldCount).toBe(heldNow().size);
      }
      // Every holder gone: nothing may stay held (a mark counted twice would).
      for (const holder of model.keys()) t.release(holder);
      model.clear();
      expect(t.heldCount).toBe(0);
      expect(t.active).toBe(false);
      drainAndCheck();
      expect(reported.size).toBe(0);
    }
  });
});

describe("token ends of marks", () => {
  // "ab" "cd" "e": ends 2, 4, 5; a leading BOS would be a 0 there.
  const ends = [0, 2, 4, 5];
  const m = (hash: string, byteEnd: number) => ({ hash, parent: null, byteEnd });

  test("a_mark_ends_at_the_fewest_tokens_that_cover_its_bytes", () => {
    const got = tokenMarks([m("a", 1), m("b", 2), m("c", 3), m("d", 5)], ends);
    expect(got.map((x) => x.tokenEnd)).toEqual([2, 2, 3, 4]);
  });

  test("a_mark_beyond_the_prompt_ends_at_the_prompt_end", () => {
    expect(tokenMarks([m("far", 1000)], ends)[0]?.tokenEnd).toBe(4);
  });

  test("a_mark_at_byte_zero_still_needs_one_token", () => {
    expect(tokenMarks([m("zero", 0)], ends)[0]?.tokenEnd).toBe(1);
  });

  test("malformed_marks_are_skipped_and_at_most_the_limit_are_kept", () => {
    const bad = [
      { hash: 1, parent: null, byteEnd: 1 },
      { hash: "x", parent: 2, byteEnd: 1 },
      { hash: "y", parent: null, byteEnd: Number.NaN },
    ];
    expect(tokenMarks(bad as never, ends)).toEqual([]);
    const many = Array.from({ length: MAX_MARKS + 10 }, (_, i) => m(`h${i}`, 1));
    expect(tokenMarks(many, ends)).toHaveLength(MAX_MARKS);
  });
});

describe("tenancy feed on the main thread", () => {
  test("closing_the_engine_evicts_everything_held_once_then_nothing", () => {
    const feed = new TenancyFeed();
    const got: TenancyDelta[] = [];
    feed.listen((d) => got.push(d));
    feed.emit({
      inserts: [
        ["a", null],
        ["b", "a"],
        ["c", "b"],
      ],
      evicts: [],
    });
    feed.emit({ inserts: [], evicts: ["c"] });
    feed.end();
    feed.end();
    feed.emit({ inserts: [["d", null]], evicts: [] });
    expect(got).toHaveLength(3);
    expect(got[2]?.evicts.sort()).toEqual(["a", "b"]);
    expect(got[2]?.inserts).toEqual([]);
  });

  test("a_throwing_listener_does_not_starve_the_others_and_unsubscribe_stops_delivery", () => {
    const feed = new TenancyFeed();
    let calls = 0;
    feed.listen(() => {
      throw new Error("boom");
    });
    const off = feed.listen(() => calls++);
    feed.emit({ inserts: [["a", null]], evicts: [] });
    off();
    feed.emit({ inserts: [], evicts: ["a"] });
    expect(calls).toBe(1);
  });

  test("an_empty_delta_is_never_delivered", () => {
    const feed = new TenancyFeed();
    let calls = 0;
    feed.listen(() => calls++);
    feed.emit({ inserts: [], evicts: [] });
    feed.end();
    expect(calls).toBe(0);
  });
});
