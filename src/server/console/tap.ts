// What a relayed answer (a peer ran the request) showed, read as it passes
// through unchanged: when its first generated text arrived, and the usage the
// serving node reported (OpenAI, Anthropic and Responses shapes). Memory is
// bounded: one partial SSE line (capped) for streams, a capped body for JSON.

/** Usage as the serving node reported it. */
export interface TappedUsage {
  promptTokens: number;
  cachedTokens: number;
  completionTokens: number;
}

/** What the tap saw, at the end of the body. */
export interface Tapped {
  usage: TappedUsage | null;
  /** performance.now() of the first generated text (streams only); null when none came. */
  firstTextAt: number | null;
  endedAt: number;
}

// A longer SSE line (a huge logprobs chunk) is passed through unread; JSON bodies past this are not parsed.
const MAX_LINE = 256 * 1024;
const MAX_JSON = 4 * 1024 * 1024;
// A data line carrying generated text: chat / completions / Anthropic / Responses deltas, non-empty.
const TEXT = /"(?:content|text|delta|partial_json|arguments)":"[^"]/;

type Num = number | undefined | null;

/** Usage of an answer or event object, in any of the three API shapes; null when it has none. */
export function usageOf(obj: unknown): TappedUsage | null {
  if (typeof obj !== "object" || obj === null) return null;
  const o = obj as Record<string, unknown>;
  const nested = (o.response as Record<string, unknown> | undefined) ?? (o.message as Record<string, unknown> | undefined);
  const u = (o.usage ?? nested?.usage) as Record<string, unknown> | undefined | null;
  if (!u || typeof u !== "object") return null;
  const n = (x: unknown): number | null => (typeof x === "number" && Number.isFinite(x) ? x : null);
  // OpenAI chat / completions
  if (n(u.prompt_tokens) !== null) {
    const d = u.prompt_tokens_details as { cached_tokens?: Num } | undefined;
    return { promptTokens: n(u.prompt_tokens) ?? 0, cachedTokens: n(d?.cached_tokens) ?? 0, completionTokens: n(u.completion_tokens) ?? 0 };
  }
  // OpenAI Responses
  if (n(u.input_tokens) !== null && u.input_tokens_details !== undefined) {
    const d = u.input_tokens_details as { cached_tokens?: Num } | undefined;
    return { promptTokens: n(u.input_tokens) ?? 0, cachedTokens: n(d?.cached_tokens) ?? 0, completionTokens: n(u.output_tokens) ?? 0 };
  }
  // Anthropic: input_tokens excludes the cache read
  if (n(u.input_tokens) !== null || n(u.cache_read_input_tokens) !== null || n(u.output_tokens) !== null) {
    const cached = n(u.cache_read_input_tokens) ?? 0;
    return { promptTokens: (n(u.input_tokens) ?? 0) + cached, cachedTokens: cached, completionTokens: n(u.output_tokens) ?? 0 };
  }
  return null;
}

/** Merge Anthropic's split usage (message_start has input, message_delta output). */
function merge(prev: TappedUsage | null, next: TappedUsage): TappedUsage {
  if (!prev) return next;
  return {
    promptTokens: next.promptTokens || prev.promptTokens,
    cachedTokens: next.cachedTokens || prev.cachedTokens,
    completionTokens: next.completionTokens || prev.completionTokens,
  };
}

/** `response` with its body observed on the way through; `done` is called once, when the body ends or is cancelled. */
export function tapResponse(response: Response, done: (t: Tapped) => void): Response {
  if (!response.body) {
    done({ usage: null, firstTextAt: null, endedAt: performance.now() });
    return response;
  }
  const sse = (response.headers.get("content-type") ?? "").startsWith("text/event-stream");
  const dec = new TextDecoder();
  let line = "";
  let skipping = false;
  let usage: TappedUsage | null = null;
  let firstTextAt: number | null = null;
  const json: Uint8Array[] = [];
  let jsonBytes = 0;
  let finished = false;
  const finish = () => {
    if (finished) return;
    finished = true;
    if (!sse && jsonBytes > 0 && jsonBytes <= MAX_JSON) {
      try {
        usage = usageOf(JSON.parse(dec.decode(Buffer.concat(json))));
      } catch {
        // not JSON: nothing to learn
      }
    }
    done({ usage, firstTextAt, endedAt: performance.now() });
  };
  const readLine = (l: string) => {
    if (!l.startsWith("data:")) return;
    if (firstTextAt === null && TEXT.test(l)) firstTextAt = performance.now();
    if (!l.includes("_tokens")) return;
    try {
      const u = usageOf(JSON.parse(l.slice(5)));
      if (u) usage = merge(usage, u);
    } catch {
      // a partial or foreign line
    }
  };
  const t = new TransformStream<Uint8Array, Uint8Array>({
    transform(chunk, c) {
      c.enqueue(chunk);
      if (!sse) {
        jsonBytes += chunk.byteLength;
        if (jsonBytes <= MAX_JSON) json.push(chunk);
        return;
      }
      const text = dec.decode(chunk, { stream: true });
      let start = 0;
      for (let i = text.indexOf("\n"); i !== -1; i = text.indexOf("\n", start)) {
        if (!skipping) readLine(line + text.slice(start, i));
        line = "";
        skipping = false;
        start = i + 1;
      }
      if (!skipping) line += text.slice(start);
      if (line.length > MAX_LINE) {
        line = "";
        skipping = true;
      }
    },
    flush() {
      if (line && !skipping) readLine(line);
      finish();
    },
  });
  const body = response.body.pipeThrough(t);
  // A client that goes away cancels the body: the record still ends.
  const reader = body.getReader();
  const relayed = new ReadableStream<Uint8Array>({
    async pull(c) {
      const { value, done: end } = await reader.read();
      if (end) {
        c.close();
        finish();
      } else c.enqueue(value);
    },
    cancel(reason) {
      finish();
      return reader.cancel(reason);
    },
  });
  return new Response(relayed, { status: response.status, statusText: response.statusText, headers: response.headers });
}
