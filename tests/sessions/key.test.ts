import { describe, expect, test } from "bun:test";
import { messageKey, type SessionMessage, storedMessage } from "../../src/sessions";

const call = (args: string, id = "call_1"): SessionMessage => ({
  role: "assistant",
  content: null,
  tool_calls: [{ id, type: "function", function: { name: "search", arguments: args } }],
});
const image = (url: string): SessionMessage => ({
  role: "user",
  content: [
    { type: "text", text: "what is this?" },
    { type: "image_url", image_url: { url } },
  ],
});

describe("message keys", () => {
  test("tool_call_arguments_key_by_parsed_json_not_by_spacing_or_key_order", () => {
    expect(messageKey(call('{"q":"x","n":1}'))).toBe(messageKey(call('{ "n": 1, "q": "x" }')));
    expect(messageKey(call('{"q":"x"}'))).not.toBe(messageKey(call('{"q":"y"}')));
  });

  test("tool_call_ids_and_reasoning_do_not_split_a_branch", () => {
    expect(messageKey(call("{}", "call_a"))).toBe(messageKey(call("{}", "call_b")));
    const a: SessionMessage = { role: "assistant", content: "x", reasoning_content: "thought 1" };
    expect(messageKey(a)).toBe(messageKey({ role: "assistant", content: "x" }));
  });

  test("role_content_and_text_parts_key_as_the_template_renders_them", () => {
    expect(messageKey({ role: "developer", content: "s" })).toBe(messageKey({ role: "system", content: "s" }));
    expect(
      messageKey({
        role: "user",
        content: [
          { type: "text", text: "a" },
          { type: "text", text: "b" },
        ],
      }),
    ).toBe(messageKey({ role: "user", content: "ab" }));
    expect(messageKey({ role: "assistant", content: null })).toBe(messageKey({ role: "assistant", content: "" }));
    expect(messageKey({ role: "user", content: "x" })).not.toBe(messageKey({ role: "assistant", content: "x" }));
  });

  test("huge_inline_media_keys_and_stores_by_digest", () => {
    const big = `data:image/png;base64,${"A".repeat(2_000_000)}`;
    const other = `data:image/png;base64,${"B".repeat(2_000_000)}`;
    expect(messageKey(image(big))).toBe(messageKey(image(big)));
    expect(messageKey(image(big))).not.toBe(messageKey(image(other)));
    const stored = storedMessage(image(big));
    expect(JSON.stringify(stored).length).toBeLessThan(300);
    expect(JSON.stringify(stored)).toContain("sha256:");
    // Short URLs stay as they are; long text is text, never digested.
    expect(JSON.stringify(storedMessage(image("https://x/y.png")))).toContain("https://x/y.png");
    const long: SessionMessage = { role: "user", content: "t".repeat(5000) };
    expect(storedMessage(long).content).toBe(long.content as string);
  });

  test("media_digest_of_structured_parts_ignores_key_order", () => {
    const a: SessionMessage = { role: "user", content: [{ type: "input_audio", input_audio: { data: "x".repeat(400), format: "wav" } }] };
    const b: SessionMessage = { role: "user", content: [{ input_audio: { format: "wav", data: "x".repeat(400) }, type: "input_audio" }] };
    expect(messageKey(a)).toBe(messageKey(b));
  });

  test("stored_message_shares_nothing_with_the_callers_object", () => {
    const m = call('{"q":"x"}');
    const s = storedMessage(m);
    ((m.tool_calls as Array<{ function: { arguments: string } }>)[0] as { function: { arguments: string } }).function.arguments = "{}";
    expect(JSON.stringify(s)).toContain('{\\"q\\":\\"x\\"}');
  });
});
