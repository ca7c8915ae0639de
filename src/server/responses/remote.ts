// A peer's streamed answer to a forwarded chat request, read back as the chat
// pipeline's events: /v1/responses forwards the translated chat request (the
// expanded, self-contained conversation) to a peer's /v1/chat/completions with
// `stream: true` and usage, and answers the client itself from these events,
// as it does from a local run. So the response is shaped, and stored for
// previous_response_id, on the node the client talks to.
import type { ParsedToolCall } from "../chat";
import { ApiError } from "../errors";
import type { ChatEvent, FinishReason } from "../openai/chat";
import type { Usage } from "../openai/run";
import type { ChatBodyT } from "../openai/schema";

/** Longest SSE event accepted from a peer (they are token deltas; this only bounds a misbehaving one). */
const MAX_EVENT_CHARS = 16 * 1024 * 1024;

/** The body forwarded for a Responses request: its chat translation, streamed with usage. */
export function forwardedChatBody(chat: ChatBodyT): Uint8Array {
  return new TextEncoder().encode(JSON.stringify({ ...chat, stream: true, stream_options: { include_usage: true } }));
}

type Chunk = {
  error?: { message?: string; type?: string; param?: string | null; code?: string | null };
  choices?: Array<{
    delta?: {
      content?: string | null;
      tool_calls?: Array<{ index?: number; id?: string; function?: { name?: string; arguments?: string } }>;
    };
    finish_reason?: FinishReason | null;
  }>;
  usage?: Usage | null;
};

function upstream(message: string): ApiError {
  return new ApiError(502, "server_error", message, null, "upstream_failed");
}

/** The `data:` payloads of an SSE stream, one per event (comments and other fields skipped). */
async function* sseData(body: ReadableStream<Uint8Array>, signal: AbortSignal): AsyncGenerator<string> {
  const reader = body.getReader();
  // A client that goes away ends the read at once (cancelling the relay cancels the peer's request).
  const stop = () => {
    reader.cancel().catch(() => {});
  };
  if (signal.aborted) stop();
  else signal.addEventListener("abort", stop, { once: true });
  const dec = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buf += done ? dec.decode() : dec.decode(value, { stream: true });
      let end = buf.indexOf("\n\n");
      while (end >= 0) {
        const event = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const data = event
          .split("\n")
          .filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(l.startsWith("data: ") ? 6 : 5))
          .join("\n");
        if (data !== "") yield data;
        end = buf.indexOf("\n\n");
      }
      if (buf.length > MAX_EVENT_CHARS) throw upstream("a peer sent an oversized event");
      if (done) return;
    }
  } finally {
    signal.removeEventListener("abort", stop);
    reader.cancel().catch(() => {});
  }
}

/**
 * The chat events of a peer's 200 SSE answer. Tool calls are gathered by index until text or the
 * end follows (this node's chat route sends each call whole). A stream that ends without a finish
 * reason, or with an error event, throws; `signal` (the client going away) ends it as cancelled.
 */
export async function* chatEventsOf(res: Response, signal: AbortSignal): AsyncGenerator<ChatEvent> {
  if (!res.body) throw upstream("a peer answered without a body");
  const pending = new Map<number, ParsedToolCall>();
  let finish: FinishReason | null = null;
  let usage: Usage | null = null;
  const flush = function* (): Generator<ChatEvent> {
    if (pending.size === 0) return;
    const calls = [...pending.entries()].sort((a, b) => a[0] - b[0]).map(([, c]) => c);
    pending.clear();
    yield { kind: "tool_calls", calls };
  };
  for await (const data of sseData(res.body, signal)) {
    if (data === "[DONE]") break;
    let chunk: Chunk;
    try {
      chunk = JSON.parse(data) as Chunk;
    } catch {
      throw upstream("a peer sent an event that is not JSON");
    }
    if (chunk.error) {
      const e = chunk.error;
      throw new ApiError(502, e.type ?? "server_error", e.message ?? "the peer failed", e.param ?? null, e.code ?? "upstream_failed");
    }
    if (chunk.usage) usage = chunk.usage;
    const choice = chunk.choices?.[0];
    if (!choice) continue;
    for (const c of choice.delta?.tool_calls ?? []) {
      const i = c.index ?? pending.size;
      const call = pending.get(i) ?? { id: "", name: "", arguments: "" };
      if (c.id) call.id = c.id;
      if (c.function?.name) call.name += c.function.name;
      if (c.function?.arguments) call.arguments += c.function.arguments;
      pending.set(i, call);
    }
    const text = choice.delta?.content;
    if (typeof text === "string" && text.length > 0) {
      yield* flush();
      yield { kind: "text", text };
    }
    if (choice.finish_reason) finish = choice.finish_reason;
  }
  if (finish === null && signal.aborted) {
    const zero = { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, prompt_tokens_details: { cached_tokens: 0 } };
    yield {
      kind: "done",
      finish: "stop",
      stopSequence: null,
      cancelled: true,
      usage: zero,
      promptTokens: 0,
      cachedTokens: 0,
      completionTokens: 0,
    };
    return;
  }
  if (finish === null) throw upstream("the peer serving this request ended its answer before it finished");
  yield* flush();
  const u = usage ?? { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0, prompt_tokens_details: { cached_tokens: 0 } };
  const cached = u.prompt_tokens_details?.cached_tokens ?? 0;
  yield {
    kind: "done",
    finish,
    stopSequence: null,
    cancelled: false,
    usage: u,
    promptTokens: u.prompt_tokens,
    cachedTokens: cached,
    completionTokens: u.completion_tokens,
  };
}
