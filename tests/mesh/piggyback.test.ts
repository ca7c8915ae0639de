import { describe, expect, test } from "bun:test";
import { generateIdentity } from "../../src/mesh/identity";
import type { ClaimRecord } from "../../src/mesh/member";
import { Piggyback } from "../../src/mesh/piggyback";

const claim = (inc = 0): ClaimRecord => {
  const id = generateIdentity();
  return { id: id.id, publicKey: id.publicKey, inc, state: "suspect" };
};

describe("piggyback buffer", () => {
  test("is_bounded_and_drops_the_most_sent_update_first", () => {
    const p = new Piggyback(4);
    const old = Array.from({ length: 4 }, () => claim());
    for (const u of old) p.add(u);
    // Send the first three a few times: they have done most of their work.
    p.take(3, 100);
    p.take(3, 100);
    const fresh = Array.from({ length: 6 }, () => claim());
    for (const u of fresh) p.add(u);
    expect(p.size).toBe(4);
    expect(p.dropped).toBe(6);
    const left = p.take(10, 100).map((u) => u.id);
    expect(left).toHaveLength(4);
    expect(left).toContain(fresh[5]?.id as string);
  });

  test("each_update_is_sent_at_most_limit_times_least_sent_first", () => {
    const p = new Piggyback(10);
    const a = claim();
    p.add(a);
    for (let i = 0; i < 3; i++) expect(p.take(5, 3).map((u) => u.id)).toEqual([a.id]);
    expect(p.take(5, 3)).toHaveLength(0);
    const b = claim();
    const c = claim();
    p.add(b);
    p.take(1, 10);
    p.add(c);
    // c was never sent: it goes before b.
    expect(p.take(1, 10)[0]?.id).toBe(c.id);
  });

  test("a_newer_update_about_a_member_replaces_the_older_one", () => {
    const p = new Piggyback(10);
    const u = claim(1);
    p.add(u);
    p.add({ ...u, inc: 2, state: "dead" });
    const out = p.take(10, 10);
    expect(out).toHaveLength(1);
    expect(out[0]).toMatchObject({ inc: 2, state: "dead" });
  });
});
