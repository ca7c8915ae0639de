// POST /v1/chat/completions: render the model's chat template, generate, and
// answer as OpenAI does (JSON or SSE), with tool calls parsed from the output.
import type { EngineLike, PrefixMark } from "../../engine";
import type { KeyMessage } from "../../routing";
import type { ChatMessage } from "../chat";
import { type ParsedToolCall, ToolCallStream } from "../chat";
import { type ApiError, badRequest, errorBody, toApiError } from "../errors";
import type { LocalRouting } from "../mesh";
import type { Metrics } from "../metrics";
import type { ServedModel } from "../model";
import { MAX_JSON_DEPTH, tooDeep } from "./depth";
import { commonPrefixLength, RoutedRun, withinPrefix } from "./routed";
import { beginRequest, checkCommon, engineOf, generateOptions, observed, primed, sseResponse, type Usage, usageOf } from "./run";
import type { ChatBodyT } from "./schema";

type FinishReason = "stop" | "length" | "tool_calls";

function toolCallsJson(calls: ParsedToolCall[], offset = 0) {
  return calls.map((c, i) => ({
    index: offset + i,
    id: c.id,
    type: "function" as const,
    function: { name: c.name, arguments: c.arguments },
  }));
}

/** The prompt text for a chat body (template rendered; a leading BOS is left to the tokenizer). */
export function renderChatPrompt(
  model: ServedModel,
  body: ChatBodyT,
  extra: readonly KeyMessage[] = [],
  addGenerationPrompt = true,
): string {
  const template = model.template;
  if (!template) throw toApiError(new Error("template missing"));
  // "developer" is OpenAI's newer name for the system role; templates know "system".
  const messages = [...body.messages, ...extra].map((m) => ({ ...m, role: m.role === "developer" ? "system" : m.role })) as ChatMessage[];
  let prompt = template.render(messages, { tools: body.tools ?? undefined, toolChoice: body.tool_choice, addGenerationPrompt });
  const bos = model.info?.bosText ?? "";
  if (bos && model.info?.addBos && prompt.startsWith(bos)) prompt = prompt.slice(bos.length);
  return prompt;
}

// Stand-ins for "whatever the conversation says next", to see which part of a prompt its next turn renders alike.
const NEXT_TURN: KeyMessage[] = [
  { role: "assistant", content: "mesh_next_reply_5c2e" },
  { role: "user", content: "mesh_next_user_5c2e" },
];

/**
 * Routing marks of a chat prompt, limited to what the conversation's next turn will render the same
 * way: all of them for templates that keep prompts prefix-stable (probed at load), else only those
 * within the common prefix of this prompt and the rendering of a continuation (one more render).
 */
function chatMarks(model: ServedModel, body: ChatBodyT, prompt: string, routed: RoutedRun): PrefixMark[] | undefined {
  const marks = routed.chatMarks(body.messages, prompt);
  if (!marks || model.template?.stability.prefixStable !== false) return marks;
  let next: string;
  try {
    next = renderChatPrompt(model, body, NEXT_TURN);
  } catch {
    return undefined;
  }
  return withinPrefix(marks, prompt, next);
}

/**
 * The reply's marks, once it is known that the next turn renders this prompt and the reply the way
 * the KV holds them (the prompt, then the generated text): templates trim replies, strip thinking,
 * or print tool calls their own way, and then the KV holds no reusable reply. Run after the answer
 * went out: it costs a render.
 */
function replyMarks(
  model: ServedModel,
  engine: EngineLike,
  body: ChatBodyT,
  prompt: string,
  raw: string,
  reply: KeyMessage,
  genId: number,
  routed: RoutedRun,
): void {
  if (!routed.active) return;
  setTimeout(() => {
    try {
      const next = renderChatPrompt(model, body, [reply], false);
      const held = prompt + raw;
      if (commonPrefixLength(next, held) >= prompt.length + raw.trimEnd().length) routed.reply(engine, genId, reply);
    } catch {
      // A template that cannot render the reply back: no reply marks.
    }
  }, 0);
}

/** The checks a chat body passes before it is routed anywhere (400 naming the field): the same wherever it runs. */
export function checkChatBody(body: ChatBodyT): void {
  checkCommon(body);
  checkDepth(body);
}

/** Refuse free-form JSON nested too deeply for the template to walk (400 naming the field). */
function checkDepth(body: ChatBodyT): void {
  const deep = tooDeep(body.tools, "tools") ?? tooDeep(body.tool_choice, "tool_choice") ?? tooDeep(body.messages, "messages");
  if (deep) {
    const field = deep.split(/[.[]/, 1)[0] ?? "messages";
    const where = deep.length > 160 ? `${deep.slice(0, 160)}...` : deep;
    throw badRequest(`${where} is nested deeper than ${MAX_JSON_DEPTH} levels`, field);
  }
}

/** Handle a validated chat request. */
export async function chatCompletion(
  model: ServedModel,
  body: ChatBodyT,
  metrics: Metrics,
  signal: AbortSignal,
  onStreamError: (e: unknown) => ApiError,
  routing: LocalRouting | null = null,
): Promise<Response | object> {
  checkChatBody(body);
  const engine = engineOf(model);
  const prompt = renderChatPrompt(model, body);
  const maxTokens = body.max_completion_tokens ?? body.max_tokens ?? undefined;
  const wantTools = (body.tools?.length ?? 0) > 0 && body.tool_choice !== "none";
  const { id, created, startedAt, abort } = beginRequest("chatcmpl", signal);
  const routed = new RoutedRun(routing, model.id);
  if (routing) model.noteTemplateDate();
  const options = generateOptions(body, prompt, maxTokens, abort.signal, chatMarks(model, body, prompt, routed));

  if (!body.stream) {
    const gen = engine.generate(options);
    let text = "";
    let usage: Usage | null = null;
    let finish: FinishReason = "stop";
    let cancelled = false;
    for await (const e of observed(gen, metrics, startedAt, abort.signal, routed.hooks())) {
      if (e.kind === "text") text += e.text;
      else if (e.kind === "done") {
        cancelled = e.finishReason === "cancelled";
        usage = usageOf(e);
        finish = e.finishReason === "length" ? "length" : "stop";
      }
    }
    let content: string | null = text;
    let toolCalls: ParsedToolCall[] = [];
    if (wantTools) {
      const s = new ToolCallStream();
      const a = s.push(text);
      const b = s.finish();
      toolCalls = [...a.toolCalls, ...b.toolCalls];
      content = a.content + b.content;
      if (toolCalls.length > 0) {
        finish = "tool_calls";
        if (content === "") content = null;
      }
    }
    // A cancelled generation left a partial sequence: nothing of a reply to mark.
    if (!cancelled)
      replyMarks(model, engine, body, prompt, text, { role: "assistant", content, tool_calls: toolCallsJson(toolCalls) }, gen.id, routed);
    return {
      id,
      object: "chat.completion",
      created,
      // The name the client asked for: a request by alias is answered under the alias, as OpenAI clients expect.
      model: body.model,
      choices: [
        {
          index: 0,
          message: { role: "assistant", content, ...(toolCalls.length > 0 ? { tool_calls: toolCallsJson(toolCalls) } : {}) },
          logprobs: null,
          finish_reason: finish,
        },
      ],
      usage,
    };
  }

  const gen = engine.generate(options);
  const events = await primed(observed(gen, metrics, startedAt, abort.signal, routed.hooks()));
  const includeUsage = body.stream_options?.include_usage === true;
  const chunk = (delta: object, finish: FinishReason | null) => ({
    id,
    object: "chat.completion.chunk",
    created,
    model: body.model,
    choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }],
  });
  return sseResponse(
    abort,
    async (send) => {
      send(chunk({ role: "assistant", content: "" }, null));
      const tools = wantTools ? new ToolCallStream() : null;
      let calls = 0;
      let finish: FinishReason = "stop";
      // The reply as the client will send it back, and as the engine produced it, for its routing marks.
      let content = "";
      let raw = "";
      const sentCalls: ParsedToolCall[] = [];
      const emit = (text: string, found: ParsedToolCall[]) => {
        if (text.length > 0) {
          send(chunk({ content: text }, null));
          content += text;
        }
        if (found.length > 0) {
          send(chunk({ tool_calls: toolCallsJson(found, calls) }, null));
          calls += found.length;
          sentCalls.push(...found);
        }
      };
      for await (const e of events) {
        if (e.kind === "text") {
          raw += e.text;
          if (!tools) emit(e.text, []);
          else {
            const d = tools.push(e.text);
            emit(d.content, d.toolCalls);
          }
        } else if (e.kind === "done") {
          if (tools) {
            const d = tools.finish();
            emit(d.content, d.toolCalls);
          }
          finish = calls > 0 ? "tool_calls" : e.finishReason === "length" ? "length" : "stop";
          if (e.finishReason !== "cancelled") {
            const reply: KeyMessage = { role: "assistant", content: content || null, tool_calls: toolCallsJson(sentCalls) };
            replyMarks(model, engine, body, prompt, raw, reply, gen.id, routed);
          }
          send(chunk({}, finish));
          if (includeUsage) send({ id, object: "chat.completion.chunk", created, model: body.model, choices: [], usage: usageOf(e) });
        }
      }
    },
    (e) => errorBody(onStreamError(e)),
  );
}
