import { describe, expect, test } from "bun:test";
import { chatAnchors, completionAnchors } from "../../src/routing/anchors";
import { CHUNK_CHARS, type KeyMessage, RouteKeyer } from "../../src/routing/key";
import { type ChatMessage, ChatTemplate, type ChatTool } from "../../src/server/chat";

const keyer = new RouteKeyer("a mesh secret of at least thirty-two characters");
const chatml = (ms: KeyMessage[]) =>
  `${ms.map((m) => `<|im_start|>${m.role}\n${typeof m.content === "string" ? m.content : ""}<|im_end|>\n`).join("")}<|im_start|>assistant\n`;
const bytes = (s: string) => Buffer.byteLength(s, "utf8");

describe("anchors of a key in the rendered prompt", () => {
  test("each_message_block_ends_where_its_content_ends", () => {
    const ms: KeyMessage[] = [
      { role: "system", content: "rules" },
      { role: "user", content: "héllo wörld" },
    ];
    const prompt = chatml(ms);
    const a = chatAnchors(keyer.chat("m", ms), ms, prompt);
    expect(a.map((x) => x.byteEnd)).toEqual([
      bytes(prompt.slice(0, prompt.indexOf("rules") + 5)),
      bytes(prompt.slice(0, prompt.indexOf("wörld") + 5)),
    ]);
    expect(a[1]?.parent).toBe(a[0]?.hash as string);
    expect(a[0]?.parent).toBeNull();
  });

  test("chunks_of_a_long_message_end_inside_it", () => {
    const long = "q".repeat(CHUNK_CHARS + 100);
    const ms: KeyMessage[] = [{ role: "user", content: long }];
    const prompt = chatml(ms);
    const a = chatAnchors(keyer.chat("m", ms), ms, prompt);
    const start = prompt.indexOf(long);
    expect(a.map((x) => x.byteEnd)).toEqual([start + CHUNK_CHARS, start + CHUNK_CHARS + 100]);
  });

  test("a_trimmed_message_is_found_and_counted_from_its_untrimmed_start", () => {
    const ms: KeyMessage[] = [{ role: "user", content: "  padded  " }];
    const prompt = "<s>[INST] padded [/INST]";
    const a = chatAnchors(keyer.chat("m", ms), ms, prompt);
    // The untrimmed content would start two characters before "padded": its end is the trimmed text's end.
    expect(a[0]?.byteEnd).toBe(prompt.indexOf("padded") + "padded".length);
  });

  test("a_block_that_cannot_be_placed_takes_the_next_place_never_an_earlier_one", () => {
    const ms: KeyMessage[] = [
      { role: "system", content: "not rendered verbatim" },
      { role: "user", content: "findable" },
    ];
    const prompt = "<|system|>NOT RENDERED<|user|>findable<|assistant|>";
    const a = chatAnchors(keyer.chat("m", ms), ms, prompt);
    const end = prompt.indexOf("findable") + "findable".length;
    expect(a.map((x) => x.byteEnd)).toEqual([end, end]);
  });

  test("a_message_with_tool_calls_ends_at_the_next_anchor", () => {
    const call = { id: "c1", type: "function", function: { name: "read", arguments: "{}" } };
    const ms: KeyMessage[] = [
      { role: "user", content: "go" },
      { role: "assistant", content: "reading", tool_calls: [call] },
      { role: "tool", tool_call_id: "c1", content: "file body" },
    ];
    const prompt = `<u>go</u><a>reading<call>read {}</call></a><t>file body</t><a>`;
    const a = chatAnchors(keyer.chat("m", ms), ms, prompt);
    const toolEnd = prompt.indexOf("file body") + "file body".length;
    expect(a[1]?.byteEnd).toBe(toolEnd);
    expect(a[2]?.byteEnd).toBe(toolEnd);
  });

  test("a_tool_result_that_also_occurs_in_the_tool_call_before_it_is_not_placed_early_regression", () => {
    // A forward search found "ok" inside the call's arguments ("lookup cookbook"): the block ended before its real end.
    const t = new ChatTemplate(null, { bosToken: "", eosToken: "" });
    const tools: ChatTool[] = [{ type: "function", function: { name: "search", parameters: { type: "object" } } }];
    const ms: KeyMessage[] = [
      { role: "user", content: "Find the cookbook" },
      {
        role: "assistant",
        content: null,
        tool_calls: [{ id: "call_1", type: "function", function: { name: "search", arguments: '{"q": "lookup cookbook"}' } }],
      },
      { role: "tool", tool_call_id: "call_1", content: "ok" },
    ];
    const prompt = t.render(ms as ChatMessage[], { tools });
    const a = chatAnchors(keyer.chat("m", ms, tools), ms, prompt);
    expect(a[2]?.byteEnd).toBeGreaterThanOrEqual(bytes(prompt.slice(0, prompt.lastIndexOf("ok") + 2)));
  });

  test("a_message_whose_text_is_a_role_name_is_not_placed_on_the_role_header_regression", () => {
    const t = new ChatTemplate(null, { bosToken: "", eosToken: "" });
    const ms: KeyMessage[] = [
      { role: "system", content: "Answer with one word." },
      { role: "user", content: "user" },
    ];
    const prompt = t.render(ms as ChatMessage[], {});
    const a = chatAnchors(keyer.chat("m", ms), ms, prompt);
    expect(a[1]?.byteEnd).toBeGreaterThanOrEqual(bytes(prompt.slice(0, prompt.indexOf("user<|im_end|>") + 4)));
  });

  test("completion_anchors_are_byte_offsets_of_its_chunks", () => {
    const p = `${"é".repeat(CHUNK_CHARS)}tail`;
    const a = completionAnchors(keyer.completion("m", p), p);
    expect(a.map((x) => x.byteEnd)).toEqual([2 * CHUNK_CHARS, 2 * CHUNK_CHARS + 4]);
  });
});
