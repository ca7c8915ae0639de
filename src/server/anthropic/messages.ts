// POST /v1/messages (Anthropic Messages) and /v1/messages/count_tokens: the
// request is translated into the equivalent chat request (system -> a system
// message, tool_use -> assistant tool_calls with JSON arguments, tool_result ->
// tool messages, tools -> function tools), which the chat pipeline runs as it
// runs /v1/chat/completions (same prompt, same routing key, same cache); the
// result is translated back into Anthropic's message or its event stream.
import type { ParsedToolCall } from "../chat";
import { type ApiError, anthropicErrorBody, badRequest } from "../errors";
import type { LocalRouting } from "../mesh";
import type { Metrics } from "../metrics";
import type { ServedModel } from "../model";
import { type ChatEvent, checkChatBody, renderChatPrompt, runChat } from "../openai/chat";
import { MAX_JSON_DEPTH, tooDeep } from "../openai/depth";
import { engineOf, SSE_KEEPALIVE_MS, type SseFraming, sseResponse } from "../openai/run";
import type { ChatBodyT } from "../openai/schema";
import type { SessionTurn } from "../sessions";
import { SchemaError, schemaGrammar } from "../structured";
import type { CountTokensBodyT, MessagesBodyT } from "./schema";

type ChatMessageT = ChatBodyT["messages"][number];
type TextPart = { type: "text"; text: string };
type ToolCallT = NonNullable<ChatMessageT["tool_calls"]>[number];
type Block = { type: string; [k: string]: unknown };

/** Anthropic's stop reasons that a local model can give. */
export type StopReason = "end_turn" | "max_tokens" | "stop_sequence" | "tool_use";

/** Anthropic usage: input_tokens counts only what was not read from cache, as Anthropic's API does. */
export interface AnthropicUsage {
  input_tokens: number;
  output_tokens: number;
  cache_read_input_tokens: number;
  cache_creation_input_tokens: number;
}

/** A content block of a reply. */
type ReplyBlock = { type: "text"; text: string } | { type: "tool_use"; id: string; name: string; input: unknown };

function text(b: Block, at: string): string {
  if (typeof b.text !== "string") throw badRequest(`${at}.text: a text block needs a string 'text'`, `${at}.text`);
  return b.text;
}

/** Text blocks as chat text parts (a string stays a string): the chat request a client would send for them. */
function textParts(content: string | readonly Block[], at: string, what: string): string | TextPart[] {
  if (typeof content === "string") return content;
  return content.map((b, j) => {
    if (b.type !== "text") {
      throw badRequest(`${at}[${j}].type: '${b.type}' blocks are not supported in ${what}, only 'text' blocks are`, `${at}[${j}].type`);
    }
    return { type: "text" as const, text: text(b, `${at}[${j}]`) };
  });
}

function unsupported(type: string, at: string, role: string, allowed: string): ApiError {
  return badRequest(
    `${at}.type: '${type}' content blocks are not supported in ${role} messages, only ${allowed} are (this server has no multimodal input)`,
    `${at}.type`,
  );
}

/** One Anthropic message as chat messages: tool results become tool messages, in block order. */
function translateMessage(m: MessagesBodyT["messages"][number], i: number, out: ChatMessageT[]): void {
  const at = `messages[${i}].content`;
  if (typeof m.content === "string") {
    out.push({ role: m.role, content: m.content });
    return;
  }
  const blocks = m.content as Block[];
  if (m.role === "user") {
    let parts: TextPart[] = [];
    let pushed = false;
    const flush = () => {
      if (parts.length === 0) return;
      out.push({ role: "user", content: parts });
      parts = [];
      pushed = true;
    };
    blocks.forEach((b, j) => {
      const here = `${at}[${j}]`;
      if (b.type === "text") parts.push({ type: "text", text: text(b, here) });
      else if (b.type === "tool_result") {
        flush();
        if (typeof b.tool_use_id !== "string" || b.tool_use_id === "") {
          throw badRequest(`${here}.tool_use_id: a tool_result block needs the id of its tool_use`, `${here}.tool_use_id`);
        }
        const c = b.content;
        let content: string | TextPart[] = "";
        if (typeof c === "string" || Array.isArray(c)) content = textParts(c as string | Block[], `${here}.content`, "tool results");
        else if (c !== undefined && c !== null) {
          throw badRequest(`${here}.content: must be a string or an array of text blocks`, `${here}.content`);
        }
        out.push({ role: "tool", tool_call_id: b.tool_use_id, content });
        pushed = true;
      } else throw unsupported(b.type, here, "user", "'text' and 'tool_result' blocks");
    });
    flush();
    if (!pushed) out.push({ role: "user", content: [] });
    return;
  }
  let reply = "";
  let hasText = false;
  const calls: ToolCallT[] = [];
  blocks.forEach((b, j) => {
    const here = `${at}[${j}]`;
    if (b.type === "text") {
      reply += text(b, here);
      hasText = true;
    } else if (b.type === "tool_use") {
      if (typeof b.id !== "string" || b.id === "") throw badRequest(`${here}.id: a tool_use block needs a string id`, `${here}.id`);
      if (typeof b.name !== "string" || b.name === "") throw badRequest(`${here}.name: a tool_use block needs a tool name`, `${here}.name`);
      const input = b.input;
      if (input === null || typeof input !== "object" || Array.isArray(input)) {
        throw badRequest(`${here}.input: a tool_use block's input must be an object`, `${here}.input`);
      }
      calls.push({ id: b.id, type: "function", function: { name: b.name, arguments: JSON.stringify(input) } });
    } else if (b.type !== "thinking" && b.type !== "redacted_thinking") {
      // Thinking blocks another model produced are dropped, as a model without thinking would not see them.
      throw unsupported(b.type, here, "assistant", "'text' and 'tool_use' blocks");
    }
  });
  out.push({
    role: "assistant",
    content: hasText ? reply : calls.length > 0 ? null : "",
    ...(calls.length > 0 ? { tool_calls: calls } : {}),
  });
}

/** Refuse free-form JSON nested too deeply to translate or render (400 naming the field). */
function checkDepth(body: CountTokensBodyT): void {
  const deep =
    tooDeep(body.tools, "tools") ??
    tooDeep(body.tool_choice, "tool_choice") ??
    tooDeep(body.system, "system") ??
    tooDeep((body as { output_config?: unknown }).output_config, "output_config") ??
    tooDeep(body.messages, "messages");
  if (deep) {
    const field = deep.split(/[.[]/, 1)[0] ?? "messages";
    const where = deep.length > 160 ? `${deep.slice(0, 160)}...` : deep;
    throw badRequest(`${where} is nested deeper than ${MAX_JSON_DEPTH} levels`, field);
  }
}

/** The conversation part (messages, system, tools, tool_choice) as a chat body. */
function toChat(body: CountTokensBodyT): ChatBodyT {
  checkDepth(body);
  const messages: ChatMessageT[] = [];
  if (body.system !== undefined) messages.push({ role: "system", content: textParts(body.system as string | Block[], "system", "system") });
  body.messages.forEach((m, i) => {
    translateMessage(m, i, messages);
  });
  const chat: ChatBodyT = { model: body.model, messages };
  if (body.tools && body.tools.length > 0) {
    chat.tools = body.tools.map((tool, i) => {
      if (tool.type !== undefined && tool.type !== "custom") {
        throw badRequest(
          `tools[${i}].type: '${tool.type}' tools run on Anthropic's servers and are not supported here`,
          `tools[${i}].type`,
        );
      }
      if (!tool.input_schema) throw badRequest(`missing required parameter 'tools[${i}].input_schema'`, `tools[${i}].input_schema`);
      const fn = {
        name: tool.name,
        ...(tool.description !== undefined ? { description: tool.description } : {}),
        parameters: tool.input_schema,
      };
      return { type: "function" as const, function: fn };
    });
  }
  const choice = body.tool_choice;
  if (choice) {
    if (choice.type === "tool" && !choice.name) throw badRequest("missing required parameter 'tool_choice.name'", "tool_choice.name");
    chat.tool_choice =
      choice.type === "any" ? "required" : choice.type === "tool" ? { type: "function", function: { name: choice.name } } : choice.type;
  }
  return chat;
}

/** A Messages body as the equivalent chat request, checked as chat checks it: every 400 comes before routing. */
export function checkMessagesBody(body: MessagesBodyT): ChatBodyT {
  const chat = toChat(body);
  chat.max_tokens = body.max_tokens;
  if (body.stop_sequences && body.stop_sequences.length > 0) chat.stop = body.stop_sequences;
  if (body.temperature !== undefined) chat.temperature = body.temperature;
  if (body.top_p !== undefined) chat.top_p = body.top_p;
  if (body.top_k !== undefined) chat.top_k = body.top_k;
  if (body.stream) chat.stream = true;
  const format = outputFormat(body.output_config);
  if (format) chat.response_format = format;
  checkChatBody(chat);
  return chat;
}

/** `output_config.format` as the equivalent chat response_format (its schema checked here, so a 400 names Anthropic's field). */
function outputFormat(config: unknown): ChatBodyT["response_format"] {
  if (config === undefined || config === null) return undefined;
  if (typeof config !== "object" || Array.isArray(config)) throw badRequest("output_config must be an object", "output_config");
  const format = (config as { format?: unknown }).format;
  if (format === undefined || format === null) return undefined;
  const f = format as { type?: unknown; schema?: unknown };
  if (typeof format !== "object" || f.type !== "json_schema") {
    throw badRequest("output_config.format.type: only 'json_schema' is supported", "output_config.format.type");
  }
  if (f.schema === null || typeof f.schema !== "object" || Array.isArray(f.schema)) {
    throw badRequest("output_config.format.schema: must be a JSON schema object", "output_config.format.schema");
  }
  try {
    schemaGrammar(f.schema, "output_config.format.schema");
  } catch (e) {
    if (e instanceof SchemaError) throw badRequest(e.message, e.path);
    throw e;
  }
  return { type: "json_schema", json_schema: { name: "output", schema: f.schema, strict: true } };
}

/** A count_tokens body as the equivalent chat request. */
export function checkCountTokensBody(body: CountTokensBodyT): ChatBodyT {
  const chat = toChat(body);
  checkChatBody(chat);
  return chat;
}

/** Tokens of the prompt `chat` renders to on `model`: what a Messages request of that conversation would report as input. */
export async function countTokens(model: ServedModel, chat: ChatBodyT): Promise<{ input_tokens: number }> {
  const engine = engineOf(model);
  const prompt = renderChatPrompt(model, chat);
  return { input_tokens: (await engine.tokenize(prompt)).length };
}

function usage(promptTokens: number, cachedTokens: number, completionTokens: number): AnthropicUsage {
  return {
    input_tokens: promptTokens - cachedTokens,
    output_tokens: completionTokens,
    cache_read_input_tokens: cachedTokens,
    cache_creation_input_tokens: 0,
  };
}

function stopReason(e: Extract<ChatEvent, { kind: "done" }>): StopReason {
  if (e.finish === "tool_calls") return "tool_use";
  if (e.finish === "length") return "max_tokens";
  return e.stopSequence !== null ? "stop_sequence" : "end_turn";
}

/** A parsed call's JSON arguments as the tool_use input object (the parser only finds calls whose arguments are an object). */
function inputOf(call: ParsedToolCall): unknown {
  try {
    return JSON.parse(call.arguments);
  } catch {
    return {};
  }
}

/** Anthropic's SSE framing: named events, no end marker, ping events as keep-alive. */
const ANTHROPIC_SSE: SseFraming = {
  frame: (data) => `event: ${(data as { type: string }).type}\ndata: ${JSON.stringify(data)}\n\n`,
  end: null,
  keepAlive: `event: ping\ndata: {"type":"ping"}\n\n`,
};

/** Handle a checked Messages request (`chat` is its translation) on `model`. */
export async function anthropicMessages(
  model: ServedModel,
  body: MessagesBodyT,
  chat: ChatBodyT,
  metrics: Metrics,
  signal: AbortSignal,
  onStreamError: (e: unknown) => ApiError,
  routing: LocalRouting | null = null,
  turn: SessionTurn | null = null,
): Promise<Response | object> {
  const run = await runChat(model, chat, metrics, signal, routing, "msg", turn);
  const { abort, events } = run;
  // Anthropic's ids read msg_...
  const id = `msg_${run.id.slice("msg-".length)}`;
  const message = (content: ReplyBlock[], stop: StopReason | null, stopSequence: string | null, u: AnthropicUsage) => ({
    id,
    type: "message",
    role: "assistant",
    model: body.model,
    content,
    stop_reason: stop,
    stop_sequence: stopSequence,
    usage: u,
  });

  if (!body.stream) {
    // Blocks in the order the model produced them, consecutive text in one block, as the stream sends them.
    const content: ReplyBlock[] = [];
    let done: Extract<ChatEvent, { kind: "done" }> | null = null;
    for await (const e of events) {
      if (e.kind === "text") {
        const last = content.at(-1);
        if (last?.type === "text") last.text += e.text;
        else content.push({ type: "text", text: e.text });
      } else if (e.kind === "tool_calls") {
        for (const c of e.calls) content.push({ type: "tool_use", id: c.id, name: c.name, input: inputOf(c) });
      } else if (e.kind === "done") done = e;
    }
    if (content.length === 0) content.push({ type: "text", text: "" });
    const end = done as Extract<ChatEvent, { kind: "done" }>;
    const reason = stopReason(end);
    return message(
      content,
      reason,
      reason === "stop_sequence" ? end.stopSequence : null,
      usage(end.promptTokens, end.cachedTokens, end.completionTokens),
    );
  }

  return sseResponse(
    abort,
    async (send) => {
      let started = false;
      const start = (promptTokens: number, cachedTokens: number) => {
        if (started) return;
        started = true;
        send({ type: "message_start", message: message([], null, null, usage(promptTokens, cachedTokens, 0)) });
        send({ type: "ping" });
      };
      let index = 0;
      let textOpen = false;
      const closeText = () => {
        if (!textOpen) return;
        send({ type: "content_block_stop", index });
        index++;
        textOpen = false;
      };
      const openText = () => {
        if (textOpen) return;
        send({ type: "content_block_start", index, content_block: { type: "text", text: "" } });
        textOpen = true;
      };
      for await (const e of events) {
        if (e.kind === "start") start(e.promptTokens, e.cachedTokens);
        else if (e.kind === "text") {
          openText();
          send({ type: "content_block_delta", index, delta: { type: "text_delta", text: e.text } });
        } else if (e.kind === "tool_calls") {
          closeText();
          for (const c of e.calls) {
            send({ type: "content_block_start", index, content_block: { type: "tool_use", id: c.id, name: c.name, input: {} } });
            send({ type: "content_block_delta", index, delta: { type: "input_json_delta", partial_json: c.arguments } });
            send({ type: "content_block_stop", index });
            index++;
          }
        } else if (e.kind === "done") {
          start(e.promptTokens, e.cachedTokens);
          // A reply with no block at all still has one (empty) text block, as the non-streamed message does.
          if (index === 0) openText();
          closeText();
          const reason = stopReason(e);
          send({
            type: "message_delta",
            delta: { stop_reason: reason, stop_sequence: reason === "stop_sequence" ? e.stopSequence : null },
            usage: usage(e.promptTokens, e.cachedTokens, e.completionTokens),
          });
          send({ type: "message_stop" });
        }
      }
    },
    (e) => anthropicErrorBody(onStreamError(e)),
    SSE_KEEPALIVE_MS,
    ANTHROPIC_SSE,
  );
}
