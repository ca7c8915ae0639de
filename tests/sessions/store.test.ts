import { describe, expect, test } from "bun:test";
import { type SessionMessage, SessionStore } from "../../src/sessions";

const user = (content: string): SessionMessage => ({ role: "user", content });

describe("session store", () => {
  test("sessions_expire_after_the_idle_ttl_but_not_while_a_request_is_in_flight", () => {
    let now = 0;
    const store = new SessionStore({ ttlMs: 1000, now: () => now });
    store.use("a");
    const busy = store.use("b");
    const b = busy.trie.begin([user("x")], "");
    now = 500;
    store.use("a");
    now = 1200;
    expect(store.sweep().map((s) => s.id)).toEqual([]);
    now = 1600;
    // a was used at 500 (idle 1100 > 1000); b is idle as long but has a request in flight.
    expect(store.sweep().map((s) => s.id)).toEqual(["a"]);
    busy.trie.abandon(b);
    expect(store.sweep().map((s) => s.id)).toEqual(["b"]);
    expect(store.size).toBe(0);
  });

  test("a_new_session_past_the_session_limit_is_refused_and_existing_ones_still_work", () => {
    const store = new SessionStore({ maxSessions: 2 });
    store.use("a");
    store.use("b");
    expect(() => store.use("c")).toThrow(/limit/);
    expect(store.use("a").id).toBe("a");
    store.delete("b");
    expect(store.use("c").id).toBe("c");
  });

  test("invalid_session_ids_are_refused", () => {
    const store = new SessionStore();
    for (const bad of ["", "a b", "x".repeat(129), "a/b", "é"]) expect(() => store.use(bad)).toThrow(/session id/);
    expect(store.size).toBe(0);
  });

  test("past_the_node_wide_byte_budget_new_turns_are_refused_until_a_session_goes", () => {
    const store = new SessionStore({ maxTotalBytes: 2000 });
    store.checkRoom();
    store.use("big").trie.begin([user("x".repeat(1500))], "");
    expect(() => store.checkRoom()).toThrow(/bytes/);
    store.delete("big");
    expect(() => store.checkRoom()).not.toThrow();
  });
});
