import { describe, expect, test } from "bun:test";
import { CHUNK_CHARS, hashFromBytes, hashToBytes, isPathHash, type KeyMessage, MAX_BLOCKS, RouteKeyer } from "../../src/routing/key";

const SECRET = "a mesh secret of at least thirty-two characters";
const sys: KeyMessage = { role: "system", content: "You are a careful agent." };
const user = (content: string): KeyMessage => ({ role: "user", content });

describe("routing key", () => {
  test("one_block_per_message_each_hash_covering_the_whole_prefix", () => {
    const k = new RouteKeyer(SECRET).chat("m", [sys, user("hello"), { role: "assistant", content: "hi" }]);
    expect(k.hashes.length).toBe(3);
    expect(new Set(k.hashes).size).toBe(3);
    expect(k.hashes.every(isPathHash)).toBe(true);
    expect(k.ends[2]).toBe(k.chars);
    expect(k.ends[0]).toBeLessThan(k.ends[1] as number);
  });

  test("a_growing_conversation_keeps_the_hashes_of_its_past", () => {
    const keyer = new RouteKeyer(SECRET);
    const turn1 = keyer.chat("m", [sys, user("list the files")]);
    const turn2 = keyer.chat("m", [sys, user("list the files"), { role: "assistant", content: "ok" }, user("now read one")]);
    expect(turn2.hashes.slice(0, 2)).toEqual([...turn1.hashes]);
  });

  test("a_long_tool_result_is_chunked_so_a_shared_beginning_still_matches", () => {
    const keyer = new RouteKeyer(SECRET);
    const long = "x".repeat(CHUNK_CHARS * 3 + 10);
    const a = keyer.chat("m", [sys, { role: "tool", tool_call_id: "c1", content: long }]);
    const b = keyer.chat("m", [sys, { role: "tool", tool_call_id: "c1", content: `${long.slice(0, CHUNK_CHARS * 2)}different tail` }]);
    expect(a.hashes.length).toBe(1 + 4);
    expect(b.hashes.slice(0, 3)).toEqual(a.hashes.slice(0, 3));
    expect(b.hashes[3]).not.toBe(a.hashes[3]);
    expect(a.spans.slice(1).map((s) => s.to)).toEqual([CHUNK_CHARS, 2 * CHUNK_CHARS, 3 * CHUNK_CHARS, 3 * CHUNK_CHARS + 10]);
  });

  test("equal_text_under_two_models_never_shares_a_hash", () => {
    const keyer = new RouteKeyer(SECRET);
    const a = keyer.chat("model-a", [sys, user("same")]);
    const b = keyer.chat("model-b", [sys, user("same")]);
    expect(a.hashes.some((h) => b.hashes.includes(h))).toBe(false);
  });

  test("another_mesh_secret_gives_unrelated_hashes", () => {
    const a = new RouteKeyer(SECRET).chat("m", [sys, user("same")]);
    const b = new RouteKeyer(`${SECRET} but another`).chat("m", [sys, user("same")]);
    expect(a.hashes.some((h) => b.hashes.includes(h))).toBe(false);
  });

  test("changing_the_tools_changes_every_hash", () => {
    const keyer = new RouteKeyer(SECRET);
    const tool = (name: string) => [{ type: "function", function: { name, parameters: {} } }];
    const a = keyer.chat("m", [sys, user("go")], tool("read"));
    const b = keyer.chat("m", [sys, user("go")], tool("write"));
    const c = keyer.chat("m", [sys, user("go")], tool("read"));
    expect(a.hashes.some((h) => b.hashes.includes(h))).toBe(false);
    expect(c.hashes).toEqual(a.hashes);
  });

  test("developer_is_keyed_as_system_as_it_renders", () => {
    const keyer = new RouteKeyer(SECRET);
    expect(keyer.chat("m", [{ role: "developer", content: "rules" }]).hashes).toEqual(
      keyer.chat("m", [{ role: "system", content: "rules" }]).hashes,
    );
  });

  test("text_parts_key_like_the_same_string", () => {
    const keyer = new RouteKeyer(SECRET);
    const parts = keyer.chat("m", [
      {
        role: "user",
        content: [
          { type: "text", text: "ab" },
          { type: "text", text: "cd" },
        ],
      },
    ]);
    expect(parts.hashes).toEqual(keyer.chat("m", [user("abcd")]).hashes);
  });

  test("media_parts_count_in_the_key_without_a_hash_each", () => {
    const keyer = new RouteKeyer(SECRET);
    const img = (url: string): KeyMessage => ({
      role: "user",
      content: [
        { type: "text", text: "see" },
        { type: "image_url", image_url: { url } },
      ],
    });
    const a = keyer.chat("m", [img("data:image/png;base64,AAAA")]);
    expect(keyer.chat("m", [img("data:image/png;base64,AAAA")]).hashes).toEqual([...a.hashes]);
    expect(keyer.chat("m", [img("data:image/png;base64,BBBB")]).hashes[0]).not.toBe(a.hashes[0] as string);
    // Many parts cost one block, not one hash per part.
    const many = keyer.chat("m", [
      { role: "user", content: Array.from({ length: 5000 }, (_, i) => ({ type: "image_url", image_url: { url: `u${i}` } })) },
    ]);
    expect(many.length).toBe(1);
  });

  test("the_reply_extends_the_key_as_the_next_turn_will_send_it", () => {
    const keyer = new RouteKeyer(SECRET);
    const call = { id: "call_1", type: "function", function: { name: "read", arguments: '{"path":"a"}' } };
    const turn1 = keyer.chat("m", [sys, user("read a")]);
    const reply: KeyMessage = { role: "assistant", content: null, tool_calls: [call] };
    const marks = keyer.extend(turn1, reply);
    const turn2 = keyer.chat("m", [sys, user("read a"), reply, { role: "tool", tool_call_id: "call_1", content: "file a" }]);
    expect(marks.map((m) => m[0])).toEqual([turn2.hashes[2] as string]);
    expect(marks[0]?.[1]).toBe(turn1.hashes[1] as string);
  });

  test("a_completion_is_keyed_by_chunks_of_its_prompt", () => {
    const keyer = new RouteKeyer(SECRET);
    const p = "y".repeat(CHUNK_CHARS + 5);
    const k = keyer.completion("m", p);
    expect(k.hashes.length).toBe(2);
    expect(k.spans.map((s) => s.to)).toEqual([CHUNK_CHARS, CHUNK_CHARS + 5]);
    expect(keyer.completion("m", `${p}more`).hashes[0]).toBe(k.hashes[0] as string);
  });

  test("a_surrogate_pair_is_never_split_by_a_chunk", () => {
    const text = `${"a".repeat(CHUNK_CHARS - 1)}😀tail`;
    const k = new RouteKeyer(SECRET).completion("m", text);
    expect(k.spans[0]?.to).toBe(CHUNK_CHARS + 1);
  });

  test("blocks_are_bounded_and_the_rest_is_left_out", () => {
    const k = new RouteKeyer(SECRET).completion("m", "z".repeat(CHUNK_CHARS * (MAX_BLOCKS + 5)));
    expect(k.hashes.length).toBe(MAX_BLOCKS);
    expect(k.truncated).toBe(true);
  });

  test("a_hash_survives_its_eight_wire_bytes", () => {
    const k = new RouteKeyer(SECRET).chat("m", [sys]);
    const buf = new Uint8Array(8);
    hashToBytes(k.hashes[0] as string, buf, 0);
    expect(hashFromBytes(buf, 0)).toBe(k.hashes[0] as string);
    const zero = hashFromBytes(new Uint8Array(8), 0);
    expect(isPathHash(zero)).toBe(true);
  });
});
