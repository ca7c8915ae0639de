import { describe, expect, test } from "bun:test";
import { chooseSlot, commonPrefix, emptiest, MIN_REUSE_TOKENS, RESTORE_MIN_GAIN } from "../../src/engine/slot-choice";

const slot = (name: string, history: number[], lastUsed: number) => ({ name, history, lastUsed });
const seq = (n: number, from = 0) => Array.from({ length: n }, (_, i) => from + i);

describe("slot choice", () => {
  test("common_prefix_of_token_arrays", () => {
    expect(commonPrefix([1, 2, 3], [1, 2, 4])).toBe(2);
    expect(commonPrefix([], [1])).toBe(0);
  });

  test("the_slot_sharing_the_longest_prefix_is_reused", () => {
    const prompt = seq(100);
    const free = [slot("short", seq(20), 5), slot("long", seq(60), 9), slot("other", seq(80, 1000), 1)];
    const c = chooseSlot(free, prompt, null);
    expect(c.reuse.name).toBe("long");
    expect(c.keep).toBe(60);
    expect(c.restoreInto).toBeNull();
  });

  test("equal_matches_go_to_the_coldest_slot", () => {
    const free = [slot("warm", seq(40), 9), slot("cold", seq(40), 2)];
    expect(chooseSlot(free, seq(50), null).reuse.name).toBe("cold");
  });

  test("a_match_too_short_to_reuse_takes_the_emptiest_slot_instead_of_wiping_a_conversation", () => {
    const free = [slot("conversation", [...seq(MIN_REUSE_TOKENS - 1), ...seq(300, 5000)], 1), slot("empty", [], 7)];
    const c = chooseSlot(free, seq(100), null);
    expect(c.reuse.name).toBe("empty");
    expect(c.keep).toBe(0);
  });

  test("a_prompt_fully_cached_keeps_one_token_to_decode", () => {
    const c = chooseSlot([slot("all", seq(64), 1)], seq(64), null);
    expect(c.keep).toBe(63);
  });

  test("a_saved_sequence_is_restored_into_the_emptiest_slot_only_when_it_serves_clearly_more", () => {
    const free = [slot("resident", seq(40), 1), slot("small", seq(10, 900), 2), slot("smaller", seq(5, 800), 3)];
    expect(chooseSlot(free, seq(200), 40 + RESTORE_MIN_GAIN - 1).restoreInto).toBeNull();
    const c = chooseSlot(free, seq(200), 40 + RESTORE_MIN_GAIN);
    expect(c.restoreInto?.name).toBe("smaller");
    expect(c.reuse.name).toBe("resident");
    expect(emptiest(free).name).toBe("smaller");
  });
});
