// Chat template rendering: OpenAI-style messages -> the prompt text a model was trained on,
// using the model's own Jinja template (tokenizer.chat_template) or our ChatML fallback.

import { Environment, Interpreter, Template } from "@huggingface/jinja";

/** A text part of an OpenAI content array; the only part type we can render. */
export interface TextContentPart {
  type: "text";
  text: string;
}

/** Any other content part (image_url, input_audio, ...), rejected at render time. */
export interface OtherContentPart {
  type: string;
  [k: string]: unknown;
}

/** One OpenAI chat message as received by the server. */
export interface ChatMessage {
  role: "system" | "user" | "assistant" | "tool";
  content: string | null | Array<TextContentPart | OtherContentPart>;
  name?: string;
  tool_calls?: Array<{ id: string; type: "function"; function: { name: string; arguments: string } }>;
  tool_call_id?: string;
}

/** One OpenAI tool definition. */
export interface ChatTool {
  type: "function";
  function: { name: string; description?: string; parameters?: Record<string, unknown> };
}

/** Options for one render. */
export interface RenderOptions {
  tools?: ChatTool[];
  /** Passed through to the template as `tool_choice`; few templates read it, enforcing it is the caller's job. */
  toolChoice?: unknown;
  /** Append the assistant turn header so the model answers next. Default true. */
  addGenerationPrompt?: boolean;
  /** The date strftime_now and date_string print; default: the template's clock. */
  now?: Date;
}

/**
 * Whether a conversation renders the same way as it grows, probed once at compile time. Prefix
 * caching (and routing by it) assumes the prompt of one turn is a prefix of the next turn's; some
 * templates break that: they print the system prompt in the last user turn (Mistral-Nemo), or
 * today's date at the top (Llama 3.x), so what a KV holds is not what the next request needs.
 */
export interface TemplateStability {
  /** A conversation's rendering up to its last message is a prefix of the rendering of its continuation. */
  prefixStable: boolean;
  /** The rendering depends on the date (it changes at midnight). */
  dateDependent: boolean;
}

/** Why rendering failed: a broken template, the template refusing the conversation, or content we cannot render. */
export type TemplateErrorKind = "parse" | "raised" | "render" | "unsupported_content";

/** A chat template could not be compiled or rendered; `kind` tells a model problem from a request problem. */
export class TemplateError extends Error {
  readonly code = "template_error";

  constructor(
    readonly kind: TemplateErrorKind,
    message: string,
  ) {
    super(message);
    this.name = "TemplateError";
  }
}

/**
 * Our own ChatML template, used when the model ships no tokenizer.chat_template.
 * Turns are `<|im_start|>{role}\n{content}<|im_end|>\n`. With tools, the system turn lists them as JSON lines
 * inside <tools></tools> and asks for calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
 * the Hermes convention that tools.ts parses; past calls are rendered the same way, and tool results
 * go in a `tool` turn wrapped in <tool_response></tool_response>. No BOS: ChatML models do not use one in text.
 */
export const FALLBACK_TEMPLATE = `{#- mesh fallback chat template (ChatML, Hermes-style tools) -#}
{%- set has_system = messages | length > 0 and messages[0].role == "system" %}
{%- if has_system or tools %}
  {{- "<|im_start|>system\\n" }}
  {%- if has_system %}
    {{- messages[0].content }}
  {%- endif %}
  {%- if tools %}
    {%- if has_system %}
      {{- "\\n\\n" }}
    {%- endif %}
    {{- "# Tools\\n\\nThese functions are available, described as JSON schemas inside <tools></tools>:\\n<tools>" }}
    {%- for tool in tools %}
      {{- "\\n" + tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nTo call one, answer with a JSON object holding its name and arguments inside <tool_call></tool_call>:\\n" }}
    {{- "<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call>" }}
  {%- endif %}
  {{- "<|im_end|>\\n" }}
{%- endif %}
{%- for message in messages %}
  {%- if message.role == "system" and loop.first %}
  {%- elif message.role == "tool" %}
    {{- "<|im_start|>tool\\n<tool_response>\\n" + message.content + "\\n</tool_response><|im_end|>\\n" }}
  {%- elif message.role == "assistant" and message.tool_calls %}
    {{- "<|im_start|>assistant" }}
    {%- if message.content %}
      {{- "\\n" + message.content }}
    {%- endif %}
    {%- for call in message.tool_calls %}
      {{- "\\n<tool_call>\\n{\\"name\\": " + call.function.name | tojson + ", \\"arguments\\": " }}
      {%- if call.function.arguments is string %}
        {{- call.function.arguments }}
      {%- else %}
        {{- call.function.arguments | tojson }}
      {%- endif %}
      {{- "}\\n</tool_call>" }}
    {%- endfor %}
    {{- "<|im_end|>\\n" }}
  {%- else %}
    {{- "<|im_start|>" + message.role + "\\n" + message.content + "<|im_end|>\\n" }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- "<|im_start|>assistant\\n" }}
{%- endif %}
`;

const MONTHS_SHORT = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
const MONTHS_LONG = [
  "January",
  "February",
  "March",
  "April",
  "May",
  "June",
  "July",
  "August",
  "September",
  "October",
  "November",
  "December",
];
const DAYS_SHORT = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const DAYS_LONG = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

const pad2 = (n: number): string => String(n).padStart(2, "0");

/** Python-style strftime for the directives chat templates use, in English whatever the host locale (as Python's C locale does). */
export function strftime(date: Date, format: string): string {
  return format.replace(/%[a-zA-Z%]/g, (d) => {
    switch (d) {
      case "%Y":
        return String(date.getFullYear());
      case "%y":
        return pad2(date.getFullYear() % 100);
      case "%m":
        return pad2(date.getMonth() + 1);
      case "%d":
        return pad2(date.getDate());
      case "%e":
        return String(date.getDate()).padStart(2, " ");
      case "%b":
        return MONTHS_SHORT[date.getMonth()] ?? "";
      case "%B":
        return MONTHS_LONG[date.getMonth()] ?? "";
      case "%a":
        return DAYS_SHORT[date.getDay()] ?? "";
      case "%A":
        return DAYS_LONG[date.getDay()] ?? "";
      case "%H":
        return pad2(date.getHours());
      case "%M":
        return pad2(date.getMinutes());
      case "%S":
        return pad2(date.getSeconds());
      case "%%":
        return "%";
      default:
        return d;
    }
  });
}

/** Python's range(), which templates use for index loops. */
function range(start: number, stop?: number, step = 1): number[] {
  if (stop === undefined) return range(0, start, step);
  if (step === 0) throw new Error("range() step must not be zero");
  const out: number[] = [];
  for (let i = start; step > 0 ? i < stop : i > stop; i += step) out.push(i);
  return out;
}

// The names @huggingface/jinja's own render() declares, minus the ones each render supplies (raise_exception, strftime_now).
const JINJA_GLOBALS: Record<string, unknown> = {
  true: true,
  false: false,
  none: null,
  True: true,
  False: false,
  None: null,
  range,
};

// Thrown by the template's raise_exception(); told apart from interpreter failures when wrapping.
class RaisedByTemplate extends Error {}

/** Flatten OpenAI content to the plain string every template expects; non-text parts are refused, not dropped. */
function flattenContent(content: ChatMessage["content"] | undefined, index: number): string {
  if (content === null || content === undefined) return "";
  if (typeof content === "string") return content;
  if (!Array.isArray(content)) {
    throw new TemplateError("unsupported_content", `messages[${index}]: content must be a string, null or an array of content parts`);
  }
  let text = "";
  for (const part of content as unknown[]) {
    const type = part !== null && typeof part === "object" ? (part as { type?: unknown }).type : undefined;
    if (type !== "text") {
      throw new TemplateError(
        "unsupported_content",
        `messages[${index}]: content part type "${String(type)}" is not supported, only "text" parts are (this server has no multimodal input)`,
      );
    }
    const t = (part as { text?: unknown }).text;
    if (typeof t !== "string") throw new TemplateError("unsupported_content", `messages[${index}]: a "text" content part has no text`);
    text += t;
  }
  return text;
}

/** Arguments as the mapping templates iterate (`| items`, `| tojson`); kept as the raw string when it is not a JSON object. */
function argumentsValue(args: string): unknown {
  try {
    const parsed: unknown = JSON.parse(args);
    if (parsed !== null && typeof parsed === "object" && !Array.isArray(parsed)) return parsed;
  } catch {
    // not JSON: the template gets the text as it came
  }
  return args;
}

/** The message as templates see it: keys are omitted rather than null, because templates test `'tool_calls' in message`. */
function toTemplateMessage(m: ChatMessage, index: number): Record<string, unknown> {
  const out: Record<string, unknown> = { role: m.role, content: flattenContent(m.content, index) };
  if (m.name !== undefined) out.name = m.name;
  if (m.tool_call_id !== undefined) out.tool_call_id = m.tool_call_id;
  if (m.tool_calls && m.tool_calls.length > 0) {
    out.tool_calls = m.tool_calls.map((c) => ({
      id: c.id,
      type: c.type,
      function: { name: c.function.name, arguments: argumentsValue(c.function.arguments) },
    }));
  }
  return out;
}

/** What a template renders by itself; what it lacks, render() adapts the conversation for (see polyfill). */
export interface TemplateCaps {
  /** A plain user turn renders at all (some templates use Jinja features the renderer lacks). */
  renders: boolean;
  /** System messages appear in the prompt. */
  system: boolean;
  /** `tool` messages (tool results) appear in the prompt. */
  toolResults: boolean;
  /** An assistant message's `tool_calls` appear in the prompt. */
  toolCalls: boolean;
  /** The `tools` definitions appear in the prompt. */
  tools: boolean;
}

const ALL_CAPS: TemplateCaps = { renders: true, system: true, toolResults: true, toolCalls: true, tools: true };

// Probe values: unlikely strings whose presence in a render proves the template printed that field.
const PROBE = {
  system: "mesh_probe_system_7f3a",
  result: "mesh_probe_result_7f3a",
  fn: "mesh_probe_fn_7f3a",
  tool: "mesh_probe_tool_7f3a",
  arg: "mesh_probe_arg_7f3a",
};
// Nine alphanumerics: the strictest call-id rule among known templates (Mistral's).
const PROBE_CALL_ID = "a1b2c3d4e";

/** The instructions a conversation gets when its template cannot show tool definitions (the fallback's wording). */
export function toolsPrompt(tools: readonly ChatTool[]): string {
  return (
    "# Tools\n\nThese functions are available, described as JSON schemas inside <tools></tools>:\n<tools>" +
    tools.map((t) => `\n${JSON.stringify(t)}`).join("") +
    "\n</tools>\n\nTo call one, answer with a JSON object holding its name and arguments inside <tool_call></tool_call>:\n" +
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
  );
}

type TemplateMessage = Record<string, unknown> & { role: string; content: string };

function callsAsText(calls: unknown): string {
  const list = Array.isArray(calls) ? (calls as { function: { name: string; arguments: unknown } }[]) : [];
  return list
    .map((c) => {
      const args = typeof c.function.arguments === "string" ? c.function.arguments : JSON.stringify(c.function.arguments);
      return `<tool_call>\n{"name": ${JSON.stringify(c.function.name)}, "arguments": ${args}}\n</tool_call>`;
    })
    .join("\n");
}

/**
 * Rewrite a conversation so a template that lacks a capability still shows
 * everything: tool definitions go into the system message, tool calls become
 * Hermes-style text, tool results become user turns, and system text is
 * folded into the first user turn. Adjacent user turns created this way are
 * merged, because many templates require roles to alternate.
 */
export function polyfill(messages: TemplateMessage[], caps: TemplateCaps, tools: readonly ChatTool[] | undefined): TemplateMessage[] {
  let out = messages.map((m) => ({ ...m }));
  let changed = false;
  if (!caps.toolCalls) {
    for (const m of out) {
      if (m.role !== "assistant" || !m.tool_calls) continue;
      m.content = [m.content, callsAsText(m.tool_calls)].filter((x) => x.length > 0).join("\n");
      delete m.tool_calls;
    }
  }
  if (!caps.toolResults) {
    for (const m of out) {
      if (m.role !== "tool") continue;
      m.role = "user";
      m.content = `<tool_response>\n${m.content}\n</tool_response>`;
      delete m.tool_call_id;
      changed = true;
    }
  }
  if (!caps.tools && tools && tools.length > 0) {
    const first = out[0];
    if (first && first.role === "system") first.content = `${first.content}\n\n${toolsPrompt(tools)}`;
    else out.unshift({ role: "system", content: toolsPrompt(tools) });
  }
  if (!caps.system) {
    const folded: TemplateMessage[] = [];
    let pending = "";
    for (const m of out) {
      if (m.role === "system") {
        pending = pending ? `${pending}\n\n${m.content}` : m.content;
        changed = true;
        continue;
      }
      if (pending && m.role === "user") {
        folded.push({ ...m, content: `${pending}\n\n${m.content}` });
        pending = "";
      } else folded.push(m);
    }
    // System text with no user turn after it becomes one.
    if (pending) folded.push({ role: "user", content: pending });
    out = folded;
  }
  if (!changed) return out;
  const merged: TemplateMessage[] = [];
  for (const m of out) {
    const last = merged[merged.length - 1];
    if (last && last.role === "user" && m.role === "user") last.content = `${last.content}\n\n${m.content}`;
    else merged.push(m);
  }
  return merged;
}

/** The tool-call form a template teaches (see ChatTemplate.toolCallFormat). */
export function toolCallFormatOf(source: string | null, caps: TemplateCaps): "hermes" | "llama3" {
  if (source === null || !caps.toolCalls || source.includes("<tool_call>")) return "hermes";
  return source.includes("<|python_tag|>") || source.includes('"parameters": dictionary') ? "llama3" : "hermes";
}

/** A compiled chat template; compile once per model and render per request. */
export class ChatTemplate {
  readonly usesFallback: boolean;
  /** What the template shows by itself, probed once at compile time. */
  readonly caps: TemplateCaps;
  /** Whether growing conversations render as growing prompts, probed once at compile time. */
  readonly stability: TemplateStability;
  /**
   * How this model writes a tool call, as far as our parser reads them: Llama 3.x JSON when the
   * template teaches that form, else Hermes `<tool_call>` blocks (also what a template without tool
   * calls is shown, see adaptConversation). A forced tool call is constrained to this form.
   */
  readonly toolCallFormat: "hermes" | "llama3";
  private readonly template: Template;
  private readonly bosToken: string;
  private readonly eosToken: string;
  private readonly now: () => Date;

  /** Compile `source` (null: FALLBACK_TEMPLATE); `now` is the clock behind strftime_now/date_string. Throws TemplateError (kind "parse"). */
  constructor(source: string | null, opts: { bosToken: string; eosToken: string; now?: () => Date }) {
    this.usesFallback = source === null;
    this.bosToken = opts.bosToken;
    this.eosToken = opts.eosToken;
    this.now = opts.now ?? (() => new Date());
    try {
      this.template = new Template(source ?? FALLBACK_TEMPLATE);
    } catch (e) {
      throw new TemplateError("parse", `chat template could not be parsed: ${errorMessage(e)}`);
    }
    this.caps = this.usesFallback ? ALL_CAPS : this.probe();
    this.toolCallFormat = toolCallFormatOf(source, this.caps);
    this.stability = this.usesFallback ? { prefixStable: true, dateDependent: false } : this.probeStability();
  }

  /** The day the template would print now, for templates that print the date: a change means every prompt changed. */
  dateKey(): string {
    return strftime(this.now(), "%Y-%m-%d");
  }

  // Render two-turn conversations and their continuations with probe strings; a template that
  // cannot render them counts as unstable (the server then checks each request instead).
  private probeStability(): TemplateStability {
    const stable = (first: ChatMessage[], next: ChatMessage[], tools?: ChatTool[]): boolean => {
      try {
        const a = this.render(first, { tools });
        const last = first[first.length - 1]?.content;
        const end = typeof last === "string" && last !== "" ? a.lastIndexOf(last) + last.length : -1;
        if (end < 0) return false;
        return this.render([...first, ...next], { tools }).startsWith(a.slice(0, end));
      } catch {
        return false;
      }
    };
    const tool: ChatTool = { type: "function", function: { name: PROBE.fn, parameters: { type: "object", properties: {} } } };
    const call = { id: PROBE_CALL_ID, type: "function" as const, function: { name: PROBE.fn, arguments: "{}" } };
    const more: ChatMessage[] = [
      { role: "assistant", content: "mesh_probe_reply_7f3a" },
      { role: "user", content: "mesh_probe_next_7f3a" },
    ];
    const plain = stable(
      [
        { role: "system", content: PROBE.system },
        { role: "user", content: "mesh_probe_user_7f3a" },
      ],
      more,
    );
    const tools = stable(
      [
        { role: "user", content: "mesh_probe_user_7f3a" },
        { role: "assistant", content: "", tool_calls: [call] },
        { role: "tool", content: PROBE.result, tool_call_id: PROBE_CALL_ID },
      ],
      more,
      [tool],
    );
    let dateDependent = false;
    try {
      const hello: ChatMessage[] = [{ role: "user", content: "hello" }];
      dateDependent =
        this.render(hello, { now: new Date(Date.UTC(2024, 0, 15, 12)) }) !==
        this.render(hello, { now: new Date(Date.UTC(2025, 6, 26, 12)) });
    } catch {
      dateDependent = false;
    }
    return { prefixStable: plain && tools, dateDependent };
  }

  // Render small conversations carrying probe strings; a probe that raises
  // counts as "not supported", so the polyfill takes over for that feature.
  private probe(): TemplateCaps {
    const tool: ChatTool = {
      type: "function",
      function: {
        name: PROBE.fn,
        description: PROBE.tool,
        parameters: { type: "object", properties: { q: { type: "string", description: "a query" } }, required: ["q"] },
      },
    };
    const showsWith = (messages: TemplateMessage[], needle: string, tools?: ChatTool[]): boolean => {
      try {
        return this.renderRaw(messages, { tools, addGenerationPrompt: true }).includes(needle);
      } catch {
        return false;
      }
    };
    // Some tool-use templates refuse to render without tools: try both ways.
    const shows = (messages: TemplateMessage[], needle: string, tools?: ChatTool[]): boolean =>
      showsWith(messages, needle) || showsWith(messages, needle, tools ?? [tool]);
    const call = { id: PROBE_CALL_ID, type: "function", function: { name: PROBE.fn, arguments: { q: PROBE.arg } } };
    const round: TemplateMessage[] = [
      { role: "user", content: "hello" },
      { role: "assistant", content: "", tool_calls: [call] },
      { role: "tool", content: PROBE.result, tool_call_id: PROBE_CALL_ID, name: PROBE.fn },
    ];
    return {
      renders: shows([{ role: "user", content: PROBE.system }], PROBE.system),
      system: shows(
        [
          { role: "system", content: PROBE.system },
          { role: "user", content: "hello" },
        ],
        PROBE.system,
      ),
      toolResults: shows(round, PROBE.result, [tool]),
      // The argument value, not the name: the name is also in the tool definitions.
      toolCalls: shows(round, PROBE.arg, [tool]) || shows(round.slice(0, 2), PROBE.arg, [tool]),
      tools: showsWith([{ role: "user", content: "hello" }], PROBE.tool, [tool]),
    };
  }

  /** Render the prompt for `messages`, adapted to what the template lacks; throws TemplateError, never another error type. */
  render(messages: ChatMessage[], opts: RenderOptions = {}): string {
    const flat = messages.map(toTemplateMessage) as TemplateMessage[];
    return this.renderRaw(polyfill(flat, this.caps, opts.tools), opts);
  }

  private renderRaw(messages: TemplateMessage[], opts: RenderOptions): string {
    try {
      const now = opts.now ?? this.now();
      const context: Record<string, unknown> = {
        ...JINJA_GLOBALS,
        messages,
        add_generation_prompt: opts.addGenerationPrompt ?? true,
        bos_token: this.bosToken,
        eos_token: this.eosToken,
        raise_exception: (message: unknown) => {
          throw new RaisedByTemplate(String(message));
        },
        strftime_now: (format: unknown) => strftime(now, String(format)),
        // Llama 3.x templates print "Today Date" from this and otherwise hard-code a 2024 date.
        date_string: strftime(now, "%d %b %Y"),
      };
      // An empty list would still switch templates into tool mode (`tools is not none`), so leave it undefined.
      if (opts.tools && opts.tools.length > 0) context.tools = opts.tools;
      if (opts.toolChoice !== undefined) context.tool_choice = opts.toolChoice;
      // Template.render() would declare its own raise_exception (a plain Error we could not tell apart from
      // interpreter failures) and refuses redeclaration, so run the parsed program in an environment we build.
      const env = new Environment();
      for (const [name, value] of Object.entries(context)) env.set(name, value);
      return String(new Interpreter(env).run(this.template.parsed).value);
    } catch (e) {
      if (e instanceof TemplateError) throw e;
      if (e instanceof RaisedByTemplate) throw new TemplateError("raised", `chat template rejected the conversation: ${e.message}`);
      throw new TemplateError("render", `chat template failed to render: ${errorMessage(e)}`);
    }
  }
}

function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
