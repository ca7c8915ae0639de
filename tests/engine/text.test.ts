import { describe, expect, test } from "bun:test";
import { completeUtf8Length, StopMatcher, Utf8Stream } from "../../src/engine/text";

const enc = (s: string) => new TextEncoder().encode(s);

describe("Utf8Stream", () => {
  test("never_emits_a_multibyte_character_split_across_pieces", () => {
    const bytes = enc("aé你🎉z");
    for (let cut = 0; cut <= bytes.length; cut++) {
      const s = new Utf8Stream();
      const out = s.push(bytes.slice(0, cut)) + s.push(bytes.slice(cut)) + s.flush();
      expect(out).toBe("aé你🎉z");
    }
    // byte by byte: nothing broken appears on the way
    const s = new Utf8Stream();
    let acc = "";
    for (const b of bytes) {
      const t = s.push(Uint8Array.of(b));
      expect(t).not.toContain("\uFFFD");
      acc += t;
    }
    expect(acc + s.flush()).toBe("aé你🎉z");
  });

  test("complete_length_holds_back_only_the_unfinished_tail", () => {
    expect(completeUtf8Length(enc("ab"))).toBe(2);
    const emoji = enc("🎉");
    expect(completeUtf8Length(emoji.slice(0, 3))).toBe(0);
    expect(completeUtf8Length(Uint8Array.of(0x61, ...emoji.slice(0, 2)))).toBe(1);
  });

  test("flush_turns_an_invalid_tail_into_a_replacement_character", () => {
    const s = new Utf8Stream();
    expect(s.push(Uint8Array.of(0x61, 0xe4))).toBe("a");
    expect(s.flush()).toBe("\uFFFD");
  });
});

describe("StopMatcher", () => {
  test("cuts_before_a_stop_string_split_across_pushes", () => {
    const m = new StopMatcher(["</end>"]);
    expect(m.push("hello </e")).toEqual({ text: "hello ", stopped: false });
    expect(m.push("nd> more")).toEqual({ text: "", stopped: true });
  });

  test("releases_held_text_that_did_not_become_a_stop", () => {
    const m = new StopMatcher(["STOP"]);
    expect(m.push("ST")).toEqual({ text: "", stopped: false });
    expect(m.push("AR")).toEqual({ text: "STAR", stopped: false });
    expect(m.push("S")).toEqual({ text: "", stopped: false });
    expect(m.flush()).toBe("S");
  });

  test("earliest_of_several_stops_wins", () => {
    const m = new StopMatcher(["bb", "a"]);
    expect(m.push("xbba")).toEqual({ text: "x", stopped: true });
  });

  test("without_stops_passes_text_through", () => {
    const m = new StopMatcher([]);
    expect(m.push("abc")).toEqual({ text: "abc", stopped: false });
  });
});
