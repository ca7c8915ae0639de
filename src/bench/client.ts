// One OpenAI-compatible chat request over fetch, timed: status, Retry-After,
// time to first byte and first token, usage (with cached tokens), and the
// error an endpoint answered, whether as an HTTP status or inside a stream.
// Bodies are read with a size cap, so a misbehaving endpoint cannot grow memory.

/** Token counts an endpoint reported. */
export interface UsageCounts {
  promptTokens: number;
  cachedTokens: number;
  completionTokens: number;
}

/** What one HTTP attempt produced. */
export interface AttemptResult {
  /** HTTP status; 0 when no response arrived (connection refused, reset, timeout). */
  status: number;
  /** Seconds from a Retry-After header, when there was one. */
  retryAfterS: number | null;
  /** Milliseconds from sending to the response headers. */
  ttfbMs: number | null;
  /** Milliseconds from sending to the first generated text or tool call of a stream. */
  ttftMs: number | null;
  /** Milliseconds from sending to the end of the body. */
  totalMs: number;
  usage: UsageCounts | null;
  /** The endpoint's error message (or the transport's), when it failed. */
  error: string | null;
  /** True when the error arrived inside a 200 event stream. */
  streamError: boolean;
  /** The node that ran the request (`x-mesh-served-by`), when the endpoint is a mesh node. */
  servedBy: string | null;
  /** Why it ran there (`x-mesh-route`: cache, load, only, local), when the endpoint is a mesh node. */
  route: string | null;
}

/** Where and how to send. */
export interface Endpoint {
  /** Base URL without /v1, e.g. http://127.0.0.1:9337 */
  url: string;
  apiKey?: string;
}

/** Largest response body read (a chat answer of a few hundred tokens is far below). */
export const MAX_BODY_BYTES = 4 * 1024 * 1024;

/** A body over the cap: the attempt is reported as failed rather than buffered. */
class BodyTooLarge extends Error {
  readonly code = "body_too_large";
}

interface RawUsage {
  prompt_tokens?: number;
  completion_tokens?: number;
  prompt_tokens_details?: { cached_tokens?: number } | null;
}

function usageFrom(u: RawUsage | null | undefined): UsageCounts | null {
  if (!u || typeof u.prompt_tokens !== "number") return null;
  return {
    promptTokens: u.prompt_tokens,
    cachedTokens: u.prompt_tokens_details?.cached_tokens ?? 0,
    completionTokens: u.completion_tokens ?? 0,
  };
}

/** Seconds from a Retry-After header (delta-seconds or an HTTP date); null when absent or unreadable. */
export function parseRetryAfter(v: string | null, now = Date.now()): number | null {
  if (v === null || v.trim() === "") return null;
  if (/^\d+(\.\d+)?$/.test(v.trim())) return Number(v.trim());
  const at = Date.parse(v);
  return Number.isNaN(at) ? null : Math.max(0, (at - now) / 1000);
}

function errorMessage(body: unknown, fallback: string): string {
  const e = (body as { error?: unknown } | null)?.error;
  if (typeof e === "string") return e;
  if (e && typeof e === "object") {
    const m = (e as { message?: unknown; code?: unknown }).message;
    const code = (e as { code?: unknown }).code;
    if (typeof m === "string") return typeof code === "string" ? `${code}: ${m}` : m;
  }
  return fallback;
}

async function readCapped(body: ReadableStream<Uint8Array>, onChunk: (text: string) => void): Promise<void> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let total = 0;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      total += value.byteLength;
      if (total > MAX_BODY_BYTES) throw new BodyTooLarge(`the response body exceeds ${MAX_BODY_BYTES} bytes`);
      onChunk(decoder.decode(value, { stream: true }));
    }
  } finally {
    reader.releaseLock();
  }
}

interface StreamChunk {
  choices?: Array<{ delta?: { content?: string | null; tool_calls?: unknown[] } }>;
  usage?: RawUsage | null;
  error?: unknown;
}

/** Send one chat request; never throws (transport failures come back as status 0). */
export async function sendChat(ep: Endpoint, body: object, timeoutMs: number): Promise<AttemptResult> {
  const stream = (body as { stream?: boolean }).stream === true;
  const start = performance.now();
  const since = () => performance.now() - start;
  const r: AttemptResult = {
    status: 0,
    retryAfterS: null,
    ttfbMs: null,
    ttftMs: null,
    totalMs: 0,
    usage: null,
    error: null,
    streamError: false,
    servedBy: null,
    route: null,
  };
  try {
    const res = await fetch(`${ep.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", ...(ep.apiKey ? { authorization: `Bearer ${ep.apiKey}` } : {}) },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(timeoutMs),
    });
    r.ttfbMs = since();
    r.status = res.status;
    r.retryAfterS = parseRetryAfter(res.headers.get("retry-after"));
    r.servedBy = res.headers.get("x-mesh-served-by");
    r.route = res.headers.get("x-mesh-route");
    const isSse = (res.headers.get("content-type") ?? "").includes("text/event-stream");
    if (!res.body) {
      r.error = res.ok ? "the response has no body" : `HTTP ${res.status}`;
    } else if (stream && res.ok && isSse) {
      await readSse(res.body, r, since);
    } else {
      let text = "";
      await readCapped(res.body, (s) => {
        text += s;
      });
      let json: unknown = null;
      try {
        json = JSON.parse(text);
      } catch {
        json = null;
      }
      if (res.ok) {
        r.usage = usageFrom((json as { usage?: RawUsage } | null)?.usage);
        if (json === null) r.error = "the response is not JSON";
        else if (r.usage === null) r.error = "the answer has no usage";
      } else {
        r.error = errorMessage(json, text.slice(0, 300) || `HTTP ${res.status}`);
      }
    }
  } catch (e) {
    r.error =
      (e as Error)?.name === "TimeoutError" ? `no answer within ${Math.round(timeoutMs / 1000)} s` : ((e as Error)?.message ?? String(e));
  }
  r.totalMs = since();
  return r;
}

async function readSse(body: ReadableStream<Uint8Array>, r: AttemptResult, since: () => number): Promise<void> {
  let buf = "";
  const line = (raw: string) => {
    const l = raw.trim();
    // llama-server once framed errors as "error: {...}"; accept both.
    const isError = l.startsWith("error:");
    if (!l.startsWith("data:") && !isError) return;
    const payload = l.slice(isError ? 6 : 5).trim();
    if (payload === "[DONE]") return;
    let chunk: StreamChunk;
    try {
      chunk = JSON.parse(payload) as StreamChunk;
    } catch {
      return;
    }
    if (isError || chunk.error !== undefined) {
      r.error = errorMessage(isError && chunk.error === undefined ? { error: chunk } : chunk, payload.slice(0, 300));
      r.streamError = true;
      return;
    }
    if (r.ttftMs === null) {
      const d = chunk.choices?.[0]?.delta;
      if ((d?.content ?? "") !== "" || (d?.tool_calls?.length ?? 0) > 0) r.ttftMs = since();
    }
    const u = usageFrom(chunk.usage);
    if (u) r.usage = u;
  };
  await readCapped(body, (s) => {
    buf += s;
    let nl = buf.indexOf("\n");
    while (nl >= 0) {
      line(buf.slice(0, nl));
      buf = buf.slice(nl + 1);
      nl = buf.indexOf("\n");
    }
  });
  if (buf.trim() !== "") line(buf);
  if (r.usage === null && r.error === null) r.error = "the stream ended without usage (stream_options.include_usage)";
}
