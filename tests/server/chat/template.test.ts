import { describe, expect, test } from "bun:test";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { type ChatMessage, ChatTemplate, type ChatTool, strftime, TemplateError } from "../../../src/server/chat/template";
import { parseToolCalls } from "../../../src/server/chat/tools";

// Real templates from the pinned llama.cpp source (its own chat-template test fixtures).
const TEMPLATE_DIR = join(import.meta.dir, "../../../vendor/llama.cpp/src/models/templates");

/** A fixture template's text; fails loudly (never skips) when the pinned source has not been fetched. */
function fixture(file: string): string {
  const path = join(TEMPLATE_DIR, file);
  if (!existsSync(path)) {
    throw new Error(`chat template fixture ${path} is missing: fetch the pinned llama.cpp source first (bun run build.ts source)`);
  }
  return readFileSync(path, "utf8");
}

const NOW = () => new Date(2025, 2, 7, 9, 30); // 7 March 2025, local time
const template = (file: string | null, bos = "<s>", eos = "</s>") =>
  new ChatTemplate(file === null ? null : fixture(file), { bosToken: bos, eosToken: eos, now: NOW });

const WEATHER: ChatTool = {
  type: "function",
  function: {
    name: "get_weather",
    description: "Current weather for a city",
    parameters: { type: "object", properties: { city: { type: "string", description: "City name" } }, required: ["city"] },
  },
};

const CHAT: ChatMessage[] = [
  { role: "system", content: "You answer in one sentence." },
  { role: "user", content: "What is the capital of France?" },
  { role: "assistant", content: "Paris." },
  { role: "user", content: "And of Italy?" },
];

/** user asks, assistant calls get_weather, the tool answers: the history of a finished tool round trip. */
function toolRoundTrip(callId = "abc123XYZ"): ChatMessage[] {
  return [
    { role: "user", content: "Weather in Paris?" },
    {
      role: "assistant",
      content: null,
      tool_calls: [{ id: callId, type: "function", function: { name: "get_weather", arguments: '{"city":"Paris"}' } }],
    },
    { role: "tool", tool_call_id: callId, content: '{"temp_c": 21}' },
  ];
}

/** The TemplateError thrown by `fn` (fails the test if it throws nothing or something else). */
function templateError(fn: () => unknown): TemplateError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(TemplateError);
    expect((e as TemplateError).code).toBe("template_error");
    return e as TemplateError;
  }
  throw new Error("expected a TemplateError, nothing was thrown");
}

describe("fallback template", () => {
  test("renders_chatml_turns_and_ends_with_the_assistant_prompt", () => {
    const t = template(null);
    expect(t.usesFallback).toBe(true);
    expect(t.render(CHAT)).toBe(
      "<|im_start|>system\nYou answer in one sentence.<|im_end|>\n" +
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" +
        "<|im_start|>assistant\nParis.<|im_end|>\n" +
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n" +
        "<|im_start|>assistant\n",
    );
  });

  test("omits_the_generation_prompt_when_asked", () => {
    const out = template(null).render([{ role: "user", content: "Hi" }], { addGenerationPrompt: false });
    expect(out).toBe("<|im_start|>user\nHi<|im_end|>\n");
  });

  test("lists_tools_in_the_system_turn_and_renders_calls_our_parser_reads_back", () => {
    const out = template(null).render(toolRoundTrip(), { tools: [WEATHER] });
    const system = out.slice(0, out.indexOf("<|im_start|>user"));
    expect(system).toContain(
      '<tools>\n{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city"',
    );
    expect(system).toContain("<tool_call>");
    const assistant = /<\|im_start\|>assistant\n([\s\S]*?)<\|im_end\|>/.exec(out)?.[1] ?? "";
    expect(parseToolCalls(assistant, { idPrefix: "t" })).toEqual({
      content: null,
      toolCalls: [{ id: "t0", name: "get_weather", arguments: '{"city":"Paris"}' }],
    });
    expect(out).toContain('<|im_start|>tool\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n');
  });
});

describe("Qwen2.5 template", () => {
  const qwen = () => template("Qwen-Qwen2.5-7B-Instruct.jinja");

  test("qwen25_puts_messages_after_their_role_markers_and_ends_with_the_assistant_prompt", () => {
    const t = qwen();
    expect(t.usesFallback).toBe(false);
    const out = t.render(CHAT);
    expect(out.startsWith("<|im_start|>system\nYou answer in one sentence.<|im_end|>\n")).toBe(true);
    expect(out).toContain("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n");
    expect(out.endsWith("<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n")).toBe(true);
  });

  test("qwen25_uses_its_default_system_prompt_when_none_is_given", () => {
    const out = qwen().render([{ role: "user", content: "Hi" }]);
    expect(out).toStartWith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.");
  });

  test("qwen25_lists_tools_in_the_system_block_and_renders_a_tool_round_trip", () => {
    const out = qwen().render(toolRoundTrip(), { tools: [WEATHER] });
    const system = out.slice(0, out.indexOf("<|im_start|>user"));
    expect(system).toContain("# Tools");
    expect(system).toContain(
      '<tools>\n{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city"',
    );
    // arguments arrive as a mapping, so `| tojson` prints an object, not a quoted string
    expect(out).toContain(
      '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
    );
    expect(out).toContain('<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>\n');
    expect(out).toEndWith("<|im_start|>assistant\n");
  });
});

describe("Llama 3.x templates", () => {
  test("llama31_renders_tools_in_the_first_user_message_and_a_json_call_round_trip", () => {
    const out = template("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>").render(
      [{ role: "system", content: "Be brief." }, ...toolRoundTrip()],
      { tools: [WEATHER] },
    );
    expect(out).toStartWith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n");
    expect(out).toContain("Today Date: 07 Mar 2025\n\nBe brief.<|eot_id|>");
    const firstUser = out.slice(out.indexOf("<|start_header_id|>user<|end_header_id|>"), out.indexOf("Weather in Paris?"));
    expect(firstUser).toContain('Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.');
    expect(firstUser).toContain('        "name": "get_weather",'); // tojson(indent=4)
    expect(out).toContain(
      '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
    );
    expect(out).toContain("<|start_header_id|>ipython<|end_header_id|>\n\n");
    expect(out).toEndWith("<|start_header_id|>assistant<|end_header_id|>\n\n");
  });

  test("llama31_reports_its_single_call_limit_as_a_template_error", () => {
    const msgs = toolRoundTrip();
    const assistant = msgs[1] as ChatMessage;
    const call = assistant.tool_calls?.[0];
    if (call === undefined) throw new Error("fixture has a call");
    assistant.tool_calls = [call, { ...call, id: "second" }];
    const err = templateError(() => template("meta-llama-Llama-3.1-8B-Instruct.jinja").render(msgs, { tools: [WEATHER] }));
    expect(err.kind).toBe("raised");
    expect(err.message).toContain("This model only supports single tool-calls at once!");
  });

  test("llama32_takes_today_from_strftime_now_and_has_no_tool_environment_without_tools", () => {
    const out = template("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>").render(CHAT);
    expect(out).toContain("Today Date: 07 Mar 2025\n\nYou answer in one sentence.<|eot_id|>");
    expect(out).not.toContain("Environment: ipython");
    expect(out).toContain("<|start_header_id|>user<|end_header_id|>\n\nAnd of Italy?<|eot_id|>");
    expect(out).toEndWith("<|start_header_id|>assistant<|end_header_id|>\n\n");
  });

  test("llama32_renders_tool_definitions_and_the_tool_call", () => {
    const out = template("meta-llama-Llama-3.2-3B-Instruct.jinja").render(toolRoundTrip(), { tools: [WEATHER] });
    expect(out).toContain("Environment: ipython\n");
    expect(out).toContain('"name": "get_weather"');
    expect(out).toContain('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>');
  });
});

describe("Hermes 2 Pro tool_use template", () => {
  const hermes = () => template("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja", "<|begin_of_text|>");

  test("hermes_describes_tools_with_python_signatures_and_renders_a_round_trip", () => {
    const out = hermes().render(toolRoundTrip(), { tools: [WEATHER] });
    expect(out).toStartWith("<|begin_of_text|><|im_start|>system\nYou are a function calling AI model.");
    expect(out).toContain('"description": "get_weather(city: str) - Current weather for a city');
    expect(out).toContain("        city(str): City name");
    expect(out).toContain("<|im_start|>user\nWeather in Paris?<|im_end|>\n");
    expect(out).toContain(
      '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
    );
    expect(out).toContain('<|im_start|>tool\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>');
    expect(out).toEndWith("<|im_start|>assistant\n");
  });

  test("hermes_passes_arguments_that_are_not_json_through_as_text", () => {
    const msgs = toolRoundTrip();
    const call = (msgs[1] as ChatMessage).tool_calls?.[0];
    if (call === undefined) throw new Error("fixture has a call");
    call.function.arguments = "city=Paris";
    expect(hermes().render(msgs, { tools: [WEATHER] })).toContain('{"name": "get_weather", "arguments": city=Paris}');
  });

  test("hermes_tool_use_template_without_tools_fails_as_template_error", () => {
    // This variant iterates `tools` unconditionally; @huggingface/jinja, unlike Python Jinja, cannot loop over undefined.
    const err = templateError(() => hermes().render([{ role: "user", content: "Hi" }]));
    expect(err.kind).toBe("render");
  });
});

describe("Mistral templates", () => {
  const nemo = () => template("mistralai-Mistral-Nemo-Instruct-2407.jinja");

  test("mistral_nemo_wraps_users_in_inst_and_ends_assistant_turns_with_eos", () => {
    const out = nemo().render(CHAT);
    expect(out).toBe("<s>[INST]What is the capital of France?[/INST]Paris.</s>[INST]You answer in one sentence.\n\nAnd of Italy?[/INST]");
  });

  test("mistral_nemo_renders_available_tools_and_a_call_with_nine_char_id", () => {
    const out = nemo().render(toolRoundTrip("abc123XYZ"), { tools: [WEATHER] });
    expect(out).toContain(
      '[AVAILABLE_TOOLS][{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city"',
    );
    expect(out).toContain("[/AVAILABLE_TOOLS][INST]Weather in Paris?[/INST]");
    expect(out).toContain('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123XYZ"}]</s>');
    expect(out).toContain('[TOOL_RESULTS]{"content": {"temp_c": 21}, "call_id": "abc123XYZ"}[/TOOL_RESULTS]');
  });

  test("mistral_nemo_rejects_openai_style_call_ids_as_template_error", () => {
    const err = templateError(() => nemo().render(toolRoundTrip("call_abcdefghijkl"), { tools: [WEATHER] }));
    expect(err.kind).toBe("raised");
    expect(err.message).toContain("Tool call IDs should be alphanumeric strings with length 9!");
  });

  test("mistral_small_32_puts_todays_date_in_its_default_system_prompt", () => {
    const out = template("Mistral-Small-3.2-24B-Instruct-2506.jinja").render([{ role: "user", content: "Hi" }]);
    expect(out).toStartWith("<s>[SYSTEM_PROMPT]You are Mistral Small 3");
    expect(out).toContain("The current date is 2025-03-07.");
    expect(out).toEndWith("[/SYSTEM_PROMPT][INST]Hi[/INST]");
  });
});

describe("errors and content", () => {
  test("template_raise_exception_becomes_template_error_with_its_message", () => {
    const t = template("google-gemma-2-2b-it.jinja", "<bos>");
    const err = templateError(() =>
      t.render([
        { role: "user", content: "a" },
        { role: "user", content: "b" },
      ]),
    );
    expect(err.kind).toBe("raised");
    expect(err.message).toBe(
      "chat template rejected the conversation: Conversation roles must alternate user/assistant/user/assistant/...",
    );
    // Its "System role not supported" is polyfilled instead (see below), so a system prompt renders.
    expect(t.render(CHAT)).toContain("You answer in one sentence.");
  });

  test("rejects_an_image_content_part_naming_its_type", () => {
    const err = templateError(() =>
      template(null).render([
        {
          role: "user",
          content: [
            { type: "text", text: "What is this?" },
            { type: "image_url", image_url: { url: "data:image/png;base64,AAAA" } },
          ],
        },
      ]),
    );
    expect(err.kind).toBe("unsupported_content");
    expect(err.message).toContain('messages[0]: content part type "image_url" is not supported');
  });

  test("joins_text_content_parts_without_separator", () => {
    const out = template("Qwen-Qwen2.5-7B-Instruct.jinja").render([
      {
        role: "user",
        content: [
          { type: "text", text: "Hello, " },
          { type: "text", text: "world" },
        ],
      },
    ]);
    expect(out).toContain("<|im_start|>user\nHello, world<|im_end|>\n");
  });

  test("reports_a_template_that_does_not_parse_as_template_error", () => {
    const err = templateError(() => new ChatTemplate("{% if messages %}unclosed", { bosToken: "", eosToken: "" }));
    expect(err.kind).toBe("parse");
    expect(err.message).toStartWith("chat template could not be parsed: ");
  });

  test("renders_repeatedly_from_one_compiled_template_without_leaking_state", () => {
    const t = template("mistralai-Mistral-Nemo-Instruct-2407.jinja");
    const first = t.render(CHAT);
    t.render(toolRoundTrip(), { tools: [WEATHER] });
    expect(t.render(CHAT)).toBe(first);
  });

  test("strftime_prints_english_names_whatever_the_locale", () => {
    const d = new Date(2024, 6, 5, 8, 3, 9); // Friday 5 July 2024
    expect(strftime(d, "%d %b %Y")).toBe("05 Jul 2024");
    expect(strftime(d, "%A, %B %e %H:%M:%S %% %y-%m")).toBe("Friday, July  5 08:03:09 % 24-07");
  });
});

describe("templates that lack a capability (polyfill)", () => {
  test("probes_what_a_template_renders_by_itself", () => {
    expect(template("Qwen-Qwen2.5-7B-Instruct.jinja").caps).toEqual({
      renders: true,
      system: true,
      toolResults: true,
      toolCalls: true,
      tools: true,
    });
    expect(template("google-gemma-2-2b-it.jinja").caps).toEqual({
      renders: true,
      system: false,
      toolResults: false,
      toolCalls: false,
      tools: false,
    });
    expect(template("microsoft-Phi-3.5-mini-instruct.jinja").caps).toMatchObject({
      system: true,
      toolResults: false,
      toolCalls: false,
      tools: false,
    });
    expect(template(null).caps.tools).toBe(true);
  });

  test("system_prompt_is_folded_into_the_first_user_turn_when_the_template_refuses_system", () => {
    // Gemma 2 raises on a system message; an agent's system prompt must still reach the model.
    const out = template("google-gemma-2-2b-it.jinja").render(CHAT);
    expect(out).toContain("<start_of_turn>user\nYou answer in one sentence.\n\nWhat is the capital of France?<end_of_turn>");
    expect(out).toContain("And of Italy?");
  });

  test("tool_round_trip_and_tool_definitions_survive_a_template_without_tool_support", () => {
    const out = template("google-gemma-2-2b-it.jinja").render(toolRoundTrip(), { tools: [WEATHER] });
    // Definitions in the (folded) system text, the call as Hermes text, the result as a user turn.
    expect(out).toContain('"name":"get_weather"');
    expect(out).toContain('<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>');
    expect(out).toContain('<tool_response>\n{"temp_c": 21}\n</tool_response>');
    // What the model answers with is what our parser reads.
    expect(parseToolCalls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>').toolCalls).toHaveLength(1);
  });

  test("phi3_keeps_system_tool_calls_and_tool_results_it_would_silently_drop", () => {
    const msgs: ChatMessage[] = [{ role: "system", content: "SYSTEM RULES" }, ...toolRoundTrip()];
    const out = template("microsoft-Phi-3.5-mini-instruct.jinja").render(msgs, { tools: [WEATHER] });
    expect(out).toContain("SYSTEM RULES");
    expect(out).toContain("get_weather");
    expect(out).toContain('{"temp_c": 21}');
    expect(out).toEndWith("<|assistant|>\n");
  });

  test("a_template_with_every_capability_renders_unchanged", () => {
    const t = template("Qwen-Qwen2.5-7B-Instruct.jinja");
    const out = t.render(toolRoundTrip(), { tools: [WEATHER] });
    expect(out).not.toContain("These functions are available");
    expect(out).toContain("<|im_start|>user\n<tool_response>");
  });

  test("a_template_the_renderer_cannot_run_is_marked_so_the_server_uses_the_fallback", () => {
    expect(template("ByteDance-Seed-OSS.jinja").caps.renders).toBe(false);
  });
});

describe("template stability (what prefix caching may rely on)", () => {
  const load = (name: string) => new ChatTemplate(fixture(name), { bosToken: "<s>", eosToken: "</s>" });

  test("a_chatml_template_renders_growing_conversations_as_growing_prompts", () => {
    expect(load("Qwen-Qwen2.5-7B-Instruct.jinja").stability).toEqual({ prefixStable: true, dateDependent: false });
    expect(new ChatTemplate(null, { bosToken: "", eosToken: "" }).stability).toEqual({ prefixStable: true, dateDependent: false });
  });

  test("a_template_that_prints_the_system_prompt_in_the_last_user_turn_is_not_prefix_stable", () => {
    expect(load("mistralai-Mistral-Nemo-Instruct-2407.jinja").stability.prefixStable).toBe(false);
  });

  test("a_template_that_prints_today_is_date_dependent", () => {
    expect(load("meta-llama-Llama-3.1-8B-Instruct.jinja").stability.dateDependent).toBe(true);
  });
});

describe("tool-call format a forced call is constrained to", () => {
  test("tool_call_format_follows_the_template", () => {
    expect(template(null).toolCallFormat).toBe("hermes");
    for (const f of [
      "Qwen-Qwen2.5-7B-Instruct.jinja",
      "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
      "mistralai-Mistral-Nemo-Instruct-2407.jinja",
    ]) {
      expect({ f, format: template(f).toolCallFormat }).toEqual({ f, format: "hermes" });
    }
    for (const f of [
      "meta-llama-Llama-3.1-8B-Instruct.jinja",
      "meta-llama-Llama-3.2-3B-Instruct.jinja",
      "meta-llama-Llama-3.3-70B-Instruct.jinja",
    ]) {
      expect({ f, format: template(f, "<|begin_of_text|>", "<|eot_id|>").toolCallFormat }).toEqual({ f, format: "llama3" });
    }
    // A template that shows no tool calls is shown Hermes blocks (the polyfill), so that is what it is held to.
    expect(template("google-gemma-2-2b-it.jinja", "<bos>", "<eos>").toolCallFormat).toBe("hermes");
  });
});
