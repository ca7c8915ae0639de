// POST /v1/chat/completions: render the model's chat template, generate, and
// answer as OpenAI does (JSON or SSE), with tool calls parsed from the output.
import type { EngineLike, PrefixMark, TokenLogprob } from "../../engine";
import type { KeyMessage } from "../../routing";
import type { ChatMessage } from "../chat";
import { type ParsedToolCall, ToolCallStream } from "../chat";
import { type ApiError, badRequest, errorBody, toApiError } from "../errors";
import type { LocalRouting } from "../mesh";
import type { Metrics } from "../metrics";
import type { ServedModel } from "../model";
import type { SessionTurn } from "../sessions";
import {
  type ChatLogprobEntry,
  chatLogprobEntry,
  chatLogprobs,
  checkForcedTool,
  responseFormatGrammar,
  toolCallGrammar,
} from "../structured";
import { MAX_JSON_DEPTH, tooDeep } from "./depth";
import { commonPrefixLength, RoutedRun, withinPrefix } from "./routed";
import {
  beginRequest,
  checkCommon,
  engineOf,
  generateOptions,
  observed,
  primed,
  type RequestStart,
  sseResponse,
  type Usage,
  usageOf,
} from "./run";
import type { ChatBodyT } from "./schema";

/** How a chat reply ended, in OpenAI's words. */
export type FinishReason = "stop" | "length" | "tool_calls";

/** Parsed tool calls as OpenAI `tool_calls` (indices from `offset`). */
export function toolCallsJson(calls: ParsedToolCall[], offset = 0) {
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
  chatLogprobs(body.logprobs, body.top_logprobs);
  checkForcedTool(body.tools, body.tool_choice);
  // Converting it is checking it: an unsupported schema feature is a 400 naming its path before anything is routed.
  responseFormatGrammar(body.response_format);
}

/**
 * The grammar a chat request runs under on `model`: the tool call tool_choice forces (in the form the
 * model's template teaches), else its response_format, else none.
 */
export function chatGrammar(model: ServedModel, body: ChatBodyT): string | null {
  if ((body.tools?.length ?? 0) > 0) {
    const tool = toolCallGrammar(body.tools, body.tool_choice, model.template?.toolCallFormat ?? "hermes");
    if (tool) return tool;
  }
  return responseFormatGrammar(body.response_format);
}

/** Refuse free-form JSON nested too deeply for the template to walk (400 naming the field). */
function checkDepth(body: ChatBodyT): void {
  const deep =
    tooDeep(body.tools, "tools") ??
    tooDeep(body.tool_choice, "tool_choice") ??
    tooDeep(body.response_format, "response_format") ??
    tooDeep(body.messages, "messages");
  if (deep) {
    const field = deep.split(/[.[]/, 1)[0] ?? "messages";
    const where = deep.length > 160 ? `${deep.slice(0, 160)}...` : deep;
    throw badRequest(`${where} is nested deeper than ${MAX_JSON_DEPTH} levels`, field);
  }
}

/** A chat generation's events, whichever API answers it: admission, reply text and completed tool calls as they come, then its end. */
export type ChatEvent =
  | { kind: "start"; promptTokens: number; cachedTokens: number }
  | { kind: "text"; text: string }
  /** Log-probabilities of the tokens behind the text that follows (only when the body asked for logprobs; other APIs skip them). */
  | { kind: "logprobs"; entries: TokenLogprob[] }
  | { kind: "tool_calls"; calls: ParsedToolCall[] }
  | {
      kind: "done";
      finish: FinishReason;
      /** The stop string that ended the reply, if one did. */
      stopSequence: string | null;
      /** The client went away before the end. */
      cancelled: boolean;
      usage: Usage;
      promptTokens: number;
      cachedTokens: number;
      completionTokens: number;
    };

/** A chat generation under way: its request bookkeeping and its events (iterate once). */
export interface ChatRun extends RequestStart {
  events: AsyncGenerator<ChatEvent>;
}

/**
 * Start a validated chat request on `model`: the one pipeline behind every chat-shaped API (render the
 * template, generate with metrics and routing marks, parse tool calls as text streams in, mark the reply
 * for the next turn). Resolves once the engine admitted it, so admission errors keep their HTTP status.
 */
export async function runChat(
  model: ServedModel,
  body: ChatBodyT,
  metrics: Metrics,
  signal: AbortSignal,
  routing: LocalRouting | null,
  idPrefix: string,
  /** The request's turn in a session: its checkpoints go to the engine, its token ids to the session. */
  turn: SessionTurn | null = null,
): Promise<ChatRun> {
  try {
    return await startChat(model, body, metrics, signal, routing, idPrefix, turn);
  } catch (e) {
    // Refused before it ran (a 400, a 429): the session keeps nothing of it.
    turn?.abandon();
    throw e;
  }
}

async function startChat(
  model: ServedModel,
  body: ChatBodyT,
  metrics: Metrics,
  signal: AbortSignal,
  routing: LocalRouting | null,
  idPrefix: string,
  turn: SessionTurn | null,
): Promise<ChatRun> {
  checkChatBody(body);
  const engine = engineOf(model);
  const prompt = renderChatPrompt(model, body);
  const maxTokens = body.max_completion_tokens ?? body.max_tokens ?? undefined;
  const wantTools = (body.tools?.length ?? 0) > 0 && body.tool_choice !== "none";
  const start = beginRequest(idPrefix, signal);
  const routed = new RoutedRun(routing, model.id);
  if (routing) model.noteTemplateDate();
  const options = generateOptions(body, prompt, maxTokens, start.abort.signal, chatMarks(model, body, prompt, routed));
  const grammar = chatGrammar(model, body);
  if (grammar) options.grammar = grammar;
  const logprobs = chatLogprobs(body.logprobs, body.top_logprobs);
  if (logprobs !== undefined) options.logprobs = logprobs;
  if (turn) {
    options.checkpoint = turn.checkpoint;
    // The engine tokenizes a text prompt exactly so (BOS added, special tokens parsed): these are its ids.
    turn.promptIds = await engine.tokenize(prompt);
  }
  const gen = engine.generate(options);
  const generated = await primed(observed(gen, metrics, start.startedAt, start.abort.signal, routed.hooks()));
  async function* events(): AsyncGenerator<ChatEvent> {
    const tools = wantTools ? new ToolCallStream() : null;
    // The reply as the client will send it back, and as the engine produced it, for its routing marks.
    let content = "";
    let raw = "";
    const calls: ParsedToolCall[] = [];
    const found = function* (d: { content: string; toolCalls: ParsedToolCall[] }): Generator<ChatEvent> {
      if (d.content.length > 0) {
        content += d.content;
        yield { kind: "text", text: d.content };
      }
      if (d.toolCalls.length > 0) {
        calls.push(...d.toolCalls);
        yield { kind: "tool_calls", calls: d.toolCalls };
      }
    };
    // The reply's token ids and log-probabilities, for the session (only kept with one).
    const ids: number[] = [];
    const lps: number[] | null = turn && logprobs !== undefined ? [] : null;
    try {
      yield* run();
    } finally {
      // Never committed (cancelled, disconnected, failed): the pending branch goes.
      turn?.abandon();
    }
    async function* run(): AsyncGenerator<ChatEvent> {
      for await (const e of generated) {
        if (e.kind === "start") yield { kind: "start", promptTokens: e.promptTokens, cachedTokens: e.cachedTokens };
        else if (e.kind === "text") {
          if (turn) {
            for (const t of e.tokens) ids.push(t);
            if (lps && e.logprobs) for (const l of e.logprobs) lps.push(l.logprob);
          }
          raw += e.text;
          if (e.logprobs && e.logprobs.length > 0) yield { kind: "logprobs", entries: e.logprobs };
          yield* found(tools ? tools.push(e.text) : { content: e.text, toolCalls: [] });
        } else if (e.kind === "done") {
          if (tools) yield* found(tools.finish());
          const cancelled = e.finishReason === "cancelled";
          // A cancelled generation left a partial sequence: nothing of a reply to mark.
          if (!cancelled) {
            const reply: KeyMessage = { role: "assistant", content: content || null, tool_calls: toolCallsJson(calls) };
            replyMarks(model, engine, body, prompt, raw, reply, gen.id, routed);
            // The reply as the client gets it (and sends it back next turn).
            const finish = calls.length > 0 ? "tool_calls" : e.finishReason === "length" ? "length" : "stop";
            turn?.commit(
              { role: "assistant", content: content || null, ...(calls.length > 0 ? { tool_calls: toolCallsJson(calls) } : {}) },
              finish,
              ids,
              lps,
              e.eog ?? null,
            );
          }
          yield {
            kind: "done",
            finish: calls.length > 0 ? "tool_calls" : e.finishReason === "length" ? "length" : "stop",
            stopSequence: e.stopSequence ?? null,
            cancelled,
            usage: usageOf(e),
            promptTokens: e.promptTokens,
            cachedTokens: e.cachedTokens,
            completionTokens: e.completionTokens,
          };
        }
      }
    }
  }
  return { ...start, events: events() };
}

/** Handle a validated chat request. */
export async function chatCompletion(
  model: ServedModel,
  body: ChatBodyT,
  metrics: Metrics,
  signal: AbortSignal,
  onStreamError: (e: unknown) => ApiError,
  routing: LocalRouting | null = null,
  turn: SessionTurn | null = null,
): Promise<Response | object> {
  const { id, created, abort, events } = await runChat(model, body, metrics, signal, routing, "chatcmpl", turn);

  if (!body.stream) {
    let content: string | null = "";
    const toolCalls: ParsedToolCall[] = [];
    let usage: Usage | null = null;
    let finish: FinishReason = "stop";
    const logprobs: ChatLogprobEntry[] | null = body.logprobs === true ? [] : null;
    for await (const e of events) {
      if (e.kind === "text") content += e.text;
      else if (e.kind === "logprobs") logprobs?.push(...e.entries.map(chatLogprobEntry));
      else if (e.kind === "tool_calls") toolCalls.push(...e.calls);
      else if (e.kind === "done") {
        usage = e.usage;
        finish = e.finish;
      }
    }
    if (toolCalls.length > 0 && content === "") content = null;
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
          logprobs: logprobs ? { content: logprobs, refusal: null } : null,
          finish_reason: finish,
        },
      ],
      usage,
    };
  }

  const includeUsage = body.stream_options?.include_usage === true;
  // Each chunk carries the logprobs of the tokens that arrived since the last one (text a tool call
  // or a stop string held back still had its tokens counted): concatenated, they are the non-streamed list.
  let pending: ChatLogprobEntry[] = [];
  const chunk = (delta: object, finish: FinishReason | null) => {
    const logprobs = pending.length > 0 ? { content: pending, refusal: null } : null;
    pending = [];
    return {
      id,
      object: "chat.completion.chunk",
      created,
      model: body.model,
      choices: [{ index: 0, delta, logprobs, finish_reason: finish }],
    };
  };
  return sseResponse(
    abort,
    async (send) => {
      send(chunk({ role: "assistant", content: "" }, null));
      let calls = 0;
      for await (const e of events) {
        if (e.kind === "text") send(chunk({ content: e.text }, null));
        else if (e.kind === "logprobs") pending.push(...e.entries.map(chatLogprobEntry));
        else if (e.kind === "tool_calls") {
          send(chunk({ tool_calls: toolCallsJson(e.calls, calls) }, null));
          calls += e.calls.length;
        } else if (e.kind === "done") {
          send(chunk({}, e.finish));
          if (includeUsage) send({ id, object: "chat.completion.chunk", created, model: body.model, choices: [], usage: e.usage });
        }
      }
    },
    (e) => errorBody(onStreamError(e)),
  );
}
