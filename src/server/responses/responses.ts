// POST /v1/responses (OpenAI Responses): the request is checked and translated
// into the equivalent chat request (translate.ts), which runs through the one
// chat pipeline here or on a peer (remote.ts); its events become the Responses
// object or its typed event stream, and the response is stored (store.ts) for
// previous_response_id and GET / DELETE /v1/responses/{id}.
import type { ParsedToolCall } from "../chat";
import type { ApiError } from "../errors";
import type { LocalRouting } from "../mesh";
import type { Metrics } from "../metrics";
import type { ServedModel } from "../model";
import { type ChatEvent, runChat } from "../openai/chat";
import { beginRequest, type RequestStart, type SseFraming, sseResponse } from "../openai/run";
import type { SessionTurn } from "../sessions";
import type { ResponsesBodyT } from "./schema";
import type { ChatMessageT, ResponseStore } from "./store";
import type { ResponsesRequest } from "./translate";

/** Responses usage: input_tokens is the whole prompt, cached_tokens the part read from the KV cache. */
export interface ResponsesUsage {
  input_tokens: number;
  input_tokens_details: { cached_tokens: number };
  output_tokens: number;
  output_tokens_details: { reasoning_tokens: number };
  total_tokens: number;
}

type OutputText = { type: "output_text"; text: string; annotations: never[]; logprobs: never[] };
type MessageItem = {
  id: string;
  type: "message";
  status: "in_progress" | "completed" | "incomplete";
  role: "assistant";
  content: OutputText[];
};
type FunctionCallItem = {
  id: string;
  type: "function_call";
  status: "in_progress" | "completed";
  call_id: string;
  name: string;
  arguments: string;
};
type OutputItem = MessageItem | FunctionCallItem;
type Status = "in_progress" | "completed" | "incomplete";

/** An id in OpenAI's style: `resp_...`, `msg_...`, `fc_...`. */
export function responseId(prefix: string): string {
  return `${prefix}_${crypto.randomUUID().replaceAll("-", "")}${crypto.randomUUID().replaceAll("-", "").slice(0, 16)}`;
}

/** The Responses API's SSE framing: named events, no end marker, comments as keep-alive. */
const RESPONSES_SSE: SseFraming = {
  frame: (data) => `event: ${(data as { type: string }).type}\ndata: ${JSON.stringify(data)}\n\n`,
  end: null,
  keepAlive: ": keep-alive\n\n",
};

const text = (t: string): OutputText => ({ type: "output_text", text: t, annotations: [], logprobs: [] });

/** The response object for `body` as it stands. */
function responseObject(
  id: string,
  createdAt: number,
  body: ResponsesBodyT,
  status: Status,
  output: OutputItem[],
  usage: ResponsesUsage | null,
) {
  return {
    id,
    object: "response" as const,
    created_at: createdAt,
    status,
    background: false,
    error: null,
    incomplete_details: status === "incomplete" ? { reason: "max_output_tokens" as const } : null,
    instructions: body.instructions ?? null,
    max_output_tokens: body.max_output_tokens ?? null,
    metadata: body.metadata ?? {},
    // The name the client asked for: a request by alias is answered under the alias.
    model: body.model,
    output,
    parallel_tool_calls: body.parallel_tool_calls ?? true,
    previous_response_id: body.previous_response_id ?? null,
    reasoning: { effort: null, summary: null },
    store: body.store !== false,
    temperature: body.temperature ?? null,
    // The format asked for, as OpenAI echoes it (checked and enforced by the grammar when not text).
    text: { format: (body as { text?: { format?: unknown } }).text?.format ?? { type: "text" as const } },
    tool_choice: body.tool_choice ?? "auto",
    tools: body.tools ?? [],
    top_p: body.top_p ?? null,
    truncation: "disabled" as const,
    usage,
    user: body.user ?? null,
  };
}

function usageOf(e: Extract<ChatEvent, { kind: "done" }>): ResponsesUsage {
  return {
    input_tokens: e.promptTokens,
    input_tokens_details: { cached_tokens: e.cachedTokens },
    output_tokens: e.completionTokens,
    output_tokens_details: { reasoning_tokens: 0 },
    total_tokens: e.promptTokens + e.completionTokens,
  };
}

/**
 * Builds the output items from chat events, in the order the model produced them (text, then a
 * function_call item per call, then more text in a new message item), and sends each step as the
 * Responses API's typed events when streaming (`send`).
 */
class OutputBuilder {
  readonly output: OutputItem[] = [];
  /** Every text piece and call, for the assistant message the conversation stores. */
  private allText = "";
  private readonly calls: ParsedToolCall[] = [];
  private open: { item: MessageItem; index: number; text: string } | null = null;
  private seq = 0;

  constructor(private readonly send: ((event: object) => void) | null) {}

  /** Send one event with the next sequence number. */
  emit(type: string, fields: object): void {
    if (this.send) this.send({ type, sequence_number: this.seq++, ...fields });
  }

  /** The next sequence number (an error event takes it). */
  nextSequence(): number {
    return this.seq++;
  }

  text(t: string): void {
    if (!this.open) {
      const item: MessageItem = { id: responseId("msg"), type: "message", status: "in_progress", role: "assistant", content: [] };
      const index = this.output.push(item) - 1;
      this.open = { item, index, text: "" };
      this.emit("response.output_item.added", { output_index: index, item: { ...item, content: [] } });
      this.emit("response.content_part.added", { item_id: item.id, output_index: index, content_index: 0, part: text("") });
    }
    this.open.text += t;
    this.allText += t;
    this.emit("response.output_text.delta", {
      item_id: this.open.item.id,
      output_index: this.open.index,
      content_index: 0,
      delta: t,
      logprobs: [],
    });
  }

  private close(status: "completed" | "incomplete"): void {
    const o = this.open;
    if (!o) return;
    this.open = null;
    const at = { item_id: o.item.id, output_index: o.index, content_index: 0 };
    this.emit("response.output_text.done", { ...at, text: o.text, logprobs: [] });
    this.emit("response.content_part.done", { ...at, part: text(o.text) });
    o.item.content = [text(o.text)];
    o.item.status = status;
    this.emit("response.output_item.done", { output_index: o.index, item: o.item });
  }

  toolCalls(calls: ParsedToolCall[]): void {
    this.close("completed");
    for (const c of calls) {
      this.calls.push(c);
      const item: FunctionCallItem = {
        id: responseId("fc"),
        type: "function_call",
        status: "in_progress",
        call_id: c.id,
        name: c.name,
        arguments: "",
      };
      const index = this.output.push(item) - 1;
      this.emit("response.output_item.added", { output_index: index, item: { ...item } });
      this.emit("response.function_call_arguments.delta", { item_id: item.id, output_index: index, delta: c.arguments });
      this.emit("response.function_call_arguments.done", { item_id: item.id, output_index: index, name: c.name, arguments: c.arguments });
      item.arguments = c.arguments;
      item.status = "completed";
      this.emit("response.output_item.done", { output_index: index, item });
    }
  }

  /** Close the output: a reply with nothing in it still has one (empty) message, as chat's has content "". */
  finish(status: "completed" | "incomplete"): void {
    if (this.output.length === 0) this.text("");
    this.close(status);
  }

  /** The output as the chat message a client would send back: what the conversation stores. */
  assistantMessage(): ChatMessageT {
    const tool_calls = this.calls.map((c) => ({ id: c.id, type: "function" as const, function: { name: c.name, arguments: c.arguments } }));
    const content = this.allText !== "" || tool_calls.length === 0 ? this.allText : null;
    return { role: "assistant", content, ...(tool_calls.length > 0 ? { tool_calls } : {}) };
  }
}

/** What answering needs besides the chat events. */
export interface AnswerContext {
  body: ResponsesBodyT;
  req: ResponsesRequest;
  store: ResponseStore;
  onStreamError: (e: unknown) => ApiError;
}

/**
 * Answer a checked Responses request from its chat events (a local run's or a peer's): the response
 * object, or its event stream. A finished response is stored before it is answered (unless
 * `store: false`), so a client can chain from it as soon as it has it.
 */
export function answerResponse(
  ctx: AnswerContext,
  start: RequestStart,
  events: AsyncGenerator<ChatEvent>,
  headers: Record<string, string> = {},
): Promise<object> | Response {
  const { body, req, store } = ctx;
  const id = responseId("resp");
  const snapshot = (status: Status, output: OutputItem[], usage: ResponsesUsage | null) =>
    responseObject(id, start.created, body, status, output, usage);
  const finish = (out: OutputBuilder, done: Extract<ChatEvent, { kind: "done" }>) => {
    const status = done.finish === "length" ? "incomplete" : "completed";
    out.finish(status);
    const response = snapshot(status, out.output, usageOf(done));
    if (body.store !== false && !done.cancelled) store.add(id, response, [...req.input, out.assistantMessage()], req.prior ?? undefined);
    return response;
  };

  if (!body.stream) {
    return (async () => {
      const out = new OutputBuilder(null);
      let response: object | null = null;
      for await (const e of events) {
        if (e.kind === "text") out.text(e.text);
        else if (e.kind === "tool_calls") out.toolCalls(e.calls);
        else if (e.kind === "done") response = finish(out, e);
      }
      return response as object;
    })();
  }

  let out: OutputBuilder | null = null;
  const res = sseResponse(
    start.abort,
    async (send) => {
      const o = new OutputBuilder(send);
      out = o;
      const initial = snapshot("in_progress", [], null);
      o.emit("response.created", { response: initial });
      o.emit("response.in_progress", { response: initial });
      for await (const e of events) {
        if (e.kind === "text") o.text(e.text);
        else if (e.kind === "tool_calls") o.toolCalls(e.calls);
        else if (e.kind === "done") {
          const response = finish(o, e);
          o.emit(response.status === "incomplete" ? "response.incomplete" : "response.completed", { response });
        }
      }
    },
    (e) => {
      const api = ctx.onStreamError(e);
      return { type: "error", code: api.code, message: api.message, param: api.param, sequence_number: out?.nextSequence() ?? 0 };
    },
    undefined,
    RESPONSES_SSE,
  );
  for (const [k, v] of Object.entries(headers)) res.headers.set(k, v);
  return res;
}

/** Run a checked Responses request on a model served here. */
export async function runResponse(
  ctx: AnswerContext,
  model: ServedModel,
  metrics: Metrics,
  signal: AbortSignal,
  routing: LocalRouting | null,
  turn: SessionTurn | null = null,
): Promise<object | Response> {
  const run = await runChat(model, ctx.req.chat, metrics, signal, routing, "resp", turn);
  return answerResponse(ctx, run, run.events);
}

/** Start bookkeeping for a request a peer runs (its events come from the peer's answer). */
export function remoteStart(signal: AbortSignal): RequestStart {
  return beginRequest("resp", signal);
}
