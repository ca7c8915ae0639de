import { describe, expect, test } from "bun:test";
import { type ParseResult, parseToolCalls, type ToolCallFormat, ToolCallStream } from "../../../src/server/chat/tools";

// Canned model outputs, written the way the models print them.
const HERMES_ONE = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>';
const HERMES_TEXT_BEFORE = 'Let me check the weather.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>';
const HERMES_TWO =
  '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' +
  '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>';
const HERMES_TEXT_AROUND = 'Checking.\n\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\nDone.';
const HERMES_MALFORMED = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>';
const HERMES_VALID_THEN_MALFORMED =
  '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\nnot json\n</tool_call>';
const HERMES_UNTERMINATED = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}';
const HERMES_NO_ARGS = '<tool_call>\n{"name": "get_time"}\n</tool_call>';
const HERMES_STRING_ARGS = '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>';
const TEXT_WITH_ANGLES = "Use a <tool> tag, or write a < b and </tool_call> by itself. ";
const LLAMA_ONE = '{"name": "get_weather", "parameters": {"city": "Paris"}}';
const LLAMA_PYTHON_TAG = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}';
const LLAMA_TWO = '\n{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "arguments": {"tz": "UTC"}}';
const LLAMA_TRICKY_STRINGS = '{"name": "search", "parameters": {"q": "a; b {c} \\"d\\" }"}}';
const LLAMA_NOT_A_CALL = '{"answer": 42, "unit": "none"}';
const LLAMA_THEN_TEXT = '{"name": "get_weather", "parameters": {"city": "Paris"}} and then I will tell you.';

const ALL_OUTPUTS = {
  HERMES_ONE,
  HERMES_TEXT_BEFORE,
  HERMES_TWO,
  HERMES_TEXT_AROUND,
  HERMES_MALFORMED,
  HERMES_VALID_THEN_MALFORMED,
  HERMES_UNTERMINATED,
  HERMES_NO_ARGS,
  HERMES_STRING_ARGS,
  TEXT_WITH_ANGLES,
  LLAMA_ONE,
  LLAMA_PYTHON_TAG,
  LLAMA_TWO,
  LLAMA_TRICKY_STRINGS,
  LLAMA_NOT_A_CALL,
  LLAMA_THEN_TEXT,
  EMPTY: "",
  WHITESPACE_ONLY: " \n ",
  PARTIAL_PYTHON_TAG: "<|python_t",
};
const FORMATS: ToolCallFormat[] = ["auto", "hermes", "llama3"];

const calls = (...c: Array<[string, unknown]>) => c.map(([name, args], i) => ({ id: `t${i}`, name, arguments: JSON.stringify(args) }));

/** Feed `chunks` to a stream and concatenate everything it yields. */
function streamAll(chunks: string[], format: ToolCallFormat): ParseResult {
  const s = new ToolCallStream({ format, idPrefix: "t" });
  let content = "";
  const toolCalls = [];
  for (const c of [...chunks.map((x) => s.push(x)), s.finish()]) {
    content += c.content;
    toolCalls.push(...c.toolCalls);
  }
  return { content, toolCalls };
}

describe("parseToolCalls hermes", () => {
  test("parses_hermes_tool_call_into_openai_tool_calls", () => {
    expect(parseToolCalls(HERMES_ONE, { idPrefix: "t" })).toEqual({
      content: null,
      toolCalls: calls(["get_weather", { city: "Paris", unit: "celsius" }]),
    });
  });

  test("keeps_text_before_a_call_as_content_without_the_separating_newline", () => {
    expect(parseToolCalls(HERMES_TEXT_BEFORE, { idPrefix: "t" })).toEqual({
      content: "Let me check the weather.",
      toolCalls: calls(["get_weather", { city: "Paris" }]),
    });
  });

  test("parses_several_calls_in_order", () => {
    const r = parseToolCalls(HERMES_TWO, { idPrefix: "t" });
    expect(r.content).toBeNull();
    expect(r.toolCalls).toEqual(calls(["get_weather", { city: "Paris" }], ["get_time", { tz: "Europe/Paris" }]));
  });

  test("joins_text_around_a_call_with_the_whitespace_that_preceded_it", () => {
    expect(parseToolCalls(HERMES_TEXT_AROUND, { idPrefix: "t" })).toEqual({
      content: "Checking.\n\nDone.",
      toolCalls: calls(["get_time", {}]),
    });
  });

  test("leaves_malformed_json_inside_tool_call_as_content", () => {
    expect(parseToolCalls(HERMES_MALFORMED)).toEqual({ content: HERMES_MALFORMED, toolCalls: [] });
  });

  test("keeps_a_malformed_block_as_content_next_to_a_valid_call", () => {
    expect(parseToolCalls(HERMES_VALID_THEN_MALFORMED, { idPrefix: "t" })).toEqual({
      content: "<tool_call>\nnot json\n</tool_call>",
      toolCalls: calls(["get_weather", { city: "Paris" }]),
    });
  });

  test("treats_an_unterminated_block_as_content", () => {
    expect(parseToolCalls(HERMES_UNTERMINATED)).toEqual({ content: HERMES_UNTERMINATED, toolCalls: [] });
  });

  test("gives_empty_arguments_to_a_call_without_arguments", () => {
    expect(parseToolCalls(HERMES_NO_ARGS, { idPrefix: "t" }).toolCalls).toEqual([{ id: "t0", name: "get_time", arguments: "{}" }]);
  });

  test("accepts_arguments_double_encoded_as_a_json_string", () => {
    expect(parseToolCalls(HERMES_STRING_ARGS, { idPrefix: "t" }).toolCalls).toEqual([
      { id: "t0", name: "get_weather", arguments: '{"city": "Paris"}' },
    ]);
  });

  test("rejects_blocks_that_are_json_but_not_a_call", () => {
    for (const body of ['{"arguments": {}}', '{"name": "", "arguments": {}}', '{"name": "f", "arguments": [1]}', '["f"]']) {
      const text = `<tool_call>${body}</tool_call>`;
      expect(parseToolCalls(text)).toEqual({ content: text, toolCalls: [] });
    }
  });

  test("leaves_text_with_look_alike_markup_unchanged", () => {
    expect(parseToolCalls(TEXT_WITH_ANGLES)).toEqual({ content: TEXT_WITH_ANGLES, toolCalls: [] });
  });

  test("hermes_format_does_not_read_llama3_json", () => {
    expect(parseToolCalls(LLAMA_ONE, { format: "hermes" })).toEqual({ content: LLAMA_ONE, toolCalls: [] });
  });
});

describe("parseToolCalls llama3", () => {
  test("parses_a_whole_output_json_call_with_parameters", () => {
    expect(parseToolCalls(LLAMA_ONE, { idPrefix: "t" })).toEqual({ content: null, toolCalls: calls(["get_weather", { city: "Paris" }]) });
  });

  test("strips_the_python_tag_before_a_json_call", () => {
    expect(parseToolCalls(LLAMA_PYTHON_TAG, { format: "llama3", idPrefix: "t" })).toEqual({
      content: null,
      toolCalls: calls(["get_weather", { city: "Paris" }]),
    });
  });

  test("parses_semicolon_separated_calls_with_parameters_or_arguments", () => {
    expect(parseToolCalls(LLAMA_TWO, { idPrefix: "t" }).toolCalls).toEqual(
      calls(["get_weather", { city: "Paris" }], ["get_time", { tz: "UTC" }]),
    );
  });

  test("is_not_confused_by_semicolons_and_braces_inside_strings", () => {
    expect(parseToolCalls(LLAMA_TRICKY_STRINGS, { idPrefix: "t" }).toolCalls).toEqual(calls(["search", { q: 'a; b {c} "d" }' }]));
  });

  test("leaves_json_that_is_not_a_call_as_content", () => {
    expect(parseToolCalls(LLAMA_NOT_A_CALL)).toEqual({ content: LLAMA_NOT_A_CALL, toolCalls: [] });
    // a name alone is not enough evidence without the tool-call markup of the hermes form
    expect(parseToolCalls('{"name": "Ada"}').toolCalls).toEqual([]);
  });

  test("leaves_a_json_call_followed_by_text_as_content", () => {
    expect(parseToolCalls(LLAMA_THEN_TEXT)).toEqual({ content: LLAMA_THEN_TEXT, toolCalls: [] });
  });

  test("llama3_format_does_not_read_hermes_blocks", () => {
    expect(parseToolCalls(HERMES_ONE, { format: "llama3" })).toEqual({ content: HERMES_ONE, toolCalls: [] });
  });
});

describe("tool call ids", () => {
  test("default_ids_are_unique_call_prefixed_alphanumerics", () => {
    const ids = [...parseToolCalls(HERMES_TWO).toolCalls, ...parseToolCalls(HERMES_TWO).toolCalls].map((c) => c.id);
    for (const id of ids) expect(id).toMatch(/^call_[A-Za-z0-9]{24}$/);
    expect(new Set(ids).size).toBe(ids.length);
  });

  test("id_prefix_numbers_calls_from_zero_per_parse", () => {
    expect(parseToolCalls(HERMES_TWO, { idPrefix: "x_" }).toolCalls.map((c) => c.id)).toEqual(["x_0", "x_1"]);
    expect(parseToolCalls(LLAMA_TWO, { idPrefix: "x_" }).toolCalls.map((c) => c.id)).toEqual(["x_0", "x_1"]);
  });
});

describe("ToolCallStream", () => {
  test("matches_one_shot_parse_for_every_two_way_split_and_per_character_deltas", () => {
    for (const [label, text] of Object.entries(ALL_OUTPUTS)) {
      for (const format of FORMATS) {
        const one = parseToolCalls(text, { format, idPrefix: "t" });
        const expected = { content: one.content ?? "", toolCalls: one.toolCalls };
        const where = `${label} (${format})`;
        for (let cut = 0; cut <= text.length; cut++) {
          expect({ where, cut, ...streamAll([text.slice(0, cut), text.slice(cut)], format) }).toEqual({ where, cut, ...expected });
        }
        expect({ where, ...streamAll([...text], format) }).toEqual({ where, ...expected });
      }
    }
  });

  test("never_emits_markup_of_a_valid_call_as_content", () => {
    for (const text of [HERMES_ONE, HERMES_TEXT_BEFORE, HERMES_TWO, HERMES_TEXT_AROUND]) {
      const s = new ToolCallStream({ format: "hermes" });
      for (const ch of text) expect(s.push(ch).content).not.toContain("<");
      expect(s.finish().content).not.toContain("<");
    }
  });

  test("holds_back_a_possible_tag_start_then_releases_it_as_text", () => {
    const s = new ToolCallStream();
    expect(s.push("Hi <tool")).toEqual({ content: "Hi", toolCalls: [] });
    expect(s.push("box> ok")).toEqual({ content: " <toolbox> ok", toolCalls: [] });
    expect(s.finish()).toEqual({ content: "", toolCalls: [] });
  });

  test("sends_text_before_a_call_before_the_call_completes_and_the_call_on_its_closing_tag", () => {
    const s = new ToolCallStream({ idPrefix: "t" });
    expect(s.push('Let me check.\n<tool_call>\n{"name": "get_time", ')).toEqual({ content: "Let me check.", toolCalls: [] });
    expect(s.push('"arguments": {}}\n</tool_')).toEqual({ content: "", toolCalls: [] });
    expect(s.push("call>")).toEqual({ content: "", toolCalls: calls(["get_time", {}]) });
    expect(s.finish()).toEqual({ content: "", toolCalls: [] });
  });

  test("buffers_llama3_json_until_finish", () => {
    const s = new ToolCallStream({ idPrefix: "t" });
    expect(s.push("<|python_tag|>")).toEqual({ content: "", toolCalls: [] });
    expect(s.push('{"name": "get_weather", ')).toEqual({ content: "", toolCalls: [] });
    expect(s.push('"parameters": {"city": "Paris"}}')).toEqual({ content: "", toolCalls: [] });
    expect(s.finish()).toEqual({ content: "", toolCalls: calls(["get_weather", { city: "Paris" }]) });
  });

  test("releases_buffered_json_that_is_not_a_call_as_content_at_finish", () => {
    const s = new ToolCallStream();
    expect(s.push(LLAMA_NOT_A_CALL).content).toBe("");
    expect(s.finish()).toEqual({ content: LLAMA_NOT_A_CALL, toolCalls: [] });
  });

  test("streams_plain_text_at_once_when_it_does_not_start_like_json", () => {
    const s = new ToolCallStream({ format: "llama3" });
    expect(s.push("Paris is sunny")).toEqual({ content: "Paris is sunny", toolCalls: [] });
  });

  test("emits_an_unterminated_call_as_content_at_finish", () => {
    const s = new ToolCallStream();
    expect(s.push(HERMES_UNTERMINATED).content).toBe("Sure.");
    expect(s.finish()).toEqual({ content: HERMES_UNTERMINATED.slice("Sure.".length), toolCalls: [] });
  });

  test("refuses_push_after_finish", () => {
    const s = new ToolCallStream();
    s.finish();
    expect(() => s.push("late")).toThrow("after finish");
  });
});
