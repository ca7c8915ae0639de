// What chat and completions share: body -> engine options, running a
// generation with metrics, usage, and SSE framing with disconnect handling.
import { EngineError, type GenerateOptions, type Generation, type GenerationEvent } from "../../engine";
import type { SamplingOptions } from "../../engine/protocol";
import { badRequest } from "../errors";
import type { Metrics } from "../metrics";
import type { ServedModel } from "../model";
import type { CompletionBodyT } from "./schema";

type Common = Omit<CompletionBodyT, "prompt" | "echo" | "logprobs">;

/** OpenAI usage, with cached prompt tokens. */
export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  prompt_tokens_details: { cached_tokens: number };
}

/** Sampling fields of a body mapped to the engine's names (only those given). */
export function samplingFrom(b: Common): Partial<SamplingOptions> {
  const s: Partial<SamplingOptions> = {};
  if (b.temperature != null) s.temperature = b.temperature;
  if (b.top_p != null) s.topP = b.top_p;
  if (b.top_k != null) s.topK = b.top_k;
  if (b.min_p != null) s.minP = b.min_p;
  if (b.seed != null) s.seed = b.seed >>> 0;
  if (b.frequency_penalty != null) s.frequencyPenalty = b.frequency_penalty;
  if (b.presence_penalty != null) s.presencePenalty = b.presence_penalty;
  if (b.repeat_penalty != null) s.repeatPenalty = b.repeat_penalty;
  return s;
}

/** Checks every endpoint makes before generating. */
export function checkCommon(b: Common): void {
  if (b.n != null && b.n !== 1) throw badRequest("only n = 1 is supported", "n", "unsupported_value");
}

/** Engine options for a request. */
export function generateOptions(
  b: Common,
  prompt: string,
  maxTokens: number | undefined,
  signal: AbortSignal,
  marks?: GenerateOptions["marks"],
): GenerateOptions {
  const stop = b.stop == null ? [] : typeof b.stop === "string" ? [b.stop] : b.stop;
  return { prompt, maxTokens, sampling: samplingFrom(b), stop, ignoreEos: b.ignore_eos ?? false, signal, ...(marks ? { marks } : {}) };
}

/** Usage from a done event. */
export function usageOf(done: Extract<GenerationEvent, { kind: "done" }>): Usage {
  return {
    prompt_tokens: done.promptTokens,
    completion_tokens: done.completionTokens,
    total_tokens: done.promptTokens + done.completionTokens,
    prompt_tokens_details: { cached_tokens: done.cachedTokens },
  };
}

/** What one finished generation showed: counts and times (performance.now() ms). */
export interface RunReport {
  promptTokens: number;
  cachedTokens: number;
  completionTokens: number;
  /** When the engine admitted it (its start event), the first token came, and it ended. */
  admittedAt: number;
  firstTokenAt: number;
  endedAt: number;
}

/** Hooks into a generation's life, for routing: what it showed when done, and its end whichever way it ends. */
export interface RunHooks {
  /** The generation is being iterated (paired with onEnd, whichever way it ends). */
  onStart?(): void;
  onDone?(r: RunReport): void;
  onEnd?(): void;
}

/** Iterate a generation while recording token counts and latencies; a generation cut short by the server is an error. */
export async function* observed(
  gen: Generation,
  metrics: Metrics,
  startedAt: number,
  client: AbortSignal,
  hooks: RunHooks = {},
): AsyncGenerator<GenerationEvent> {
  let first = 0;
  let admitted = 0;
  hooks.onStart?.();
  try {
    for await (const e of gen) {
      // Cancelled without the client asking (shutdown): never pass partial text off as a finished answer.
      if (e.kind === "done" && e.finishReason === "cancelled" && !client.aborted) {
        throw new EngineError("engine_closed", "the server stopped this request before it finished (shutting down); retry");
      }
      if (e.kind === "start") {
        admitted = performance.now();
        metrics.queueWait.observe(e.waitedMs / 1000);
      }
      if (e.kind === "text" && e.tokens.length > 0 && first === 0) {
        first = performance.now();
        metrics.ttft.observe((first - startedAt) / 1000);
      }
      if (e.kind === "done") {
        metrics.promptTokens.inc({}, e.promptTokens);
        metrics.cachedTokens.inc({}, e.cachedTokens);
        metrics.completionTokens.inc({}, e.completionTokens);
        if (first > 0 && e.completionTokens > 1)
          metrics.tokenLatency.observe((performance.now() - first) / 1000 / (e.completionTokens - 1));
        if (e.finishReason !== "cancelled") {
          const now = performance.now();
          hooks.onDone?.({
            promptTokens: e.promptTokens,
            cachedTokens: e.cachedTokens,
            completionTokens: e.completionTokens,
            admittedAt: admitted || now,
            firstTokenAt: first || now,
            endedAt: now,
          });
        }
      }
      yield e;
    }
  } finally {
    hooks.onEnd?.();
  }
}

/**
 * Wait for a generation's first event before answering: admission errors
 * (prompt too long, busy) then keep their HTTP status instead of arriving
 * inside a 200 stream. Returns an iterator that replays that event.
 */
export async function primed(events: AsyncGenerator<GenerationEvent>): Promise<AsyncGenerator<GenerationEvent>> {
  const first = await events.next();
  return (async function* () {
    try {
      if (!first.done) yield first.value;
      yield* events;
    } finally {
      await events.return(undefined);
    }
  })();
}

/** The model must be loaded to generate. */
export function engineOf(model: ServedModel) {
  if (!model.engine || model.status !== "ready") {
    throw new EngineError("engine_closed", `model '${model.id}' is ${model.status}${model.error ? `: ${model.error}` : ""}`);
  }
  return model.engine;
}

const enc = new TextEncoder();

/** How long a stream may stay silent before an SSE comment is sent to keep the connection alive. */
export const SSE_KEEPALIVE_MS = 15_000;

/** How events are written on an SSE stream: one event, the end of the stream, and the keep-alive. */
export interface SseFraming {
  frame(data: unknown): string;
  /** Written after the last event (and after an error event); null for nothing. */
  end: string | null;
  /** Sent when the stream has been silent for a while. */
  keepAlive: string;
}

/** OpenAI's framing: `data:` lines, a final `[DONE]`, comments as keep-alive. */
export const OPENAI_SSE: SseFraming = {
  frame: (data) => `data: ${JSON.stringify(data)}\n\n`,
  end: "data: [DONE]\n\n",
  keepAlive: ": keep-alive\n\n",
};

/**
 * A text/event-stream Response. `produce` writes events with send(); a client
 * that disconnects aborts `controller`, which cancels the generation; a
 * stream silent for `keepAliveMs` gets the framing's keep-alive (ignored by clients).
 */
export function sseResponse(
  abort: AbortController,
  produce: (send: (data: unknown) => void) => Promise<void>,
  onError: (e: unknown) => unknown,
  keepAliveMs = SSE_KEEPALIVE_MS,
  framing: SseFraming = OPENAI_SSE,
): Response {
  let timer: ReturnType<typeof setInterval> | null = null;
  const stop = () => {
    if (timer) clearInterval(timer);
    timer = null;
  };
  const stream = new ReadableStream<Uint8Array>({
    async start(c) {
      let quiet = true;
      const send = (data: unknown) => {
        quiet = false;
        if (!abort.signal.aborted) c.enqueue(enc.encode(framing.frame(data)));
      };
      // A request may wait minutes for KV room before its first token: a
      // keep-alive now and then keeps proxies and idle timeouts from cutting it.
      timer = setInterval(() => {
        if (quiet && !abort.signal.aborted) c.enqueue(enc.encode(framing.keepAlive));
        quiet = true;
      }, keepAliveMs);
      try {
        await produce(send);
      } catch (e) {
        // Headers are gone already: the error travels as an SSE event.
        send(onError(e));
      } finally {
        stop();
      }
      if (!abort.signal.aborted) {
        if (framing.end !== null) c.enqueue(enc.encode(framing.end));
        c.close();
      }
    },
    cancel() {
      stop();
      abort.abort();
    },
  });
  return new Response(stream, {
    headers: { "content-type": "text/event-stream", "cache-control": "no-cache", connection: "keep-alive", "x-accel-buffering": "no" },
  });
}

/** Per-request bookkeeping shared by every generating endpoint. */
export interface RequestStart {
  id: string;
  created: number;
  startedAt: number;
  /** Aborted when the client goes away (also if it already has). */
  abort: AbortController;
}

/** Start a request: its id, timestamps, and an abort controller tied to the client's connection. */
export function beginRequest(prefix: string, client: AbortSignal): RequestStart {
  const abort = new AbortController();
  // A client that left while the body was parsed never fires "abort" again.
  if (client.aborted) abort.abort();
  else client.addEventListener("abort", () => abort.abort(), { once: true });
  return { id: randomId(prefix), created: Math.floor(Date.now() / 1000), startedAt: performance.now(), abort };
}

/** A short random id suffix (OpenAI ids look like chatcmpl-abc123). */
export function randomId(prefix: string): string {
  return `${prefix}-${crypto.randomUUID().replaceAll("-", "").slice(0, 24)}`;
}
