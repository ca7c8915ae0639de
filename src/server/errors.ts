// The one place where error values become HTTP responses: in OpenAI's shape
// {"error": {"message", "type", "param", "code"}}, or on Anthropic's routes in
// its shape {"type": "error", "error": {"type", "message"}}. Nothing here ever
// puts a stack trace in a response.
import { EngineError } from "../engine/errors";
import { SessionError } from "../sessions";
import { type ErrorFields, ForwardError, type ForwardShape } from "./forward";

/** An error that knows its HTTP status and OpenAI error fields. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly type: string,
    message: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
    readonly retryAfter: number | null = null,
  ) {
    super(message);
    this.name = "ApiError";
  }
}

/** 400 naming the offending field. */
export function badRequest(message: string, param: string | null = null, code: string | null = "invalid_value"): ApiError {
  return new ApiError(400, "invalid_request_error", message, param, code);
}

/** Map any thrown value to an ApiError; unknown errors become a generic 500 (logged by the caller). */
export function toApiError(e: unknown): ApiError {
  if (e instanceof ApiError) return e;
  if (e instanceof SessionError) return sessionApiError(e);
  if (e instanceof EngineError) {
    switch (e.code) {
      case "context_length_exceeded":
        return new ApiError(400, "invalid_request_error", e.message, "messages", "context_length_exceeded");
      case "invalid_request":
        return new ApiError(400, "invalid_request_error", e.message, null, "invalid_value");
      case "engine_busy":
        return new ApiError(
          429,
          "rate_limit_error",
          "the server is busy: too many requests in flight, retry shortly",
          null,
          "server_busy",
          1,
        );
      case "queue_full":
      case "queue_timeout":
        return new ApiError(
          429,
          "rate_limit_error",
          `the server is overloaded: ${e.message}; retry later`,
          null,
          e.code,
          e.retryAfter ?? 1,
        );
      case "kv_exhausted":
        return new ApiError(
          503,
          "server_error",
          "the server ran out of KV cache space for this request, retry shortly",
          null,
          "kv_exhausted",
          e.retryAfter ?? 1,
        );
      case "engine_closed":
      case "model_load_failed":
      case "context_create_failed":
        return new ApiError(503, "server_error", e.message, null, "model_unavailable", 5);
      case "cancelled":
        return new ApiError(499, "server_error", "the request was cancelled", null, "cancelled");
      case "decode_failed":
        return new ApiError(500, "server_error", e.message, null, "decode_failed");
    }
  }
  if (e instanceof ForwardError) {
    if (e.code === "no_route") return new ApiError(404, "invalid_request_error", e.message, "model", "model_not_found");
    if (e.code === "cancelled") return new ApiError(499, "server_error", "the request was cancelled", null, "cancelled");
    return new ApiError(502, "server_error", e.message, null, "upstream_failed");
  }
  const code = (e as { code?: unknown } | null)?.code;
  if (code === "template_error") {
    // The template refusing the conversation or its content is the caller's problem; a broken template is ours.
    const kind = (e as { kind?: string }).kind;
    if (kind === "raised" || kind === "unsupported_content") {
      return new ApiError(400, "invalid_request_error", (e as Error).message, "messages", "template_error");
    }
    return new ApiError(500, "server_error", `the model's chat template failed: ${(e as Error).message}`, null, "template_error");
  }
  return new ApiError(500, "server_error", "internal server error", null, "internal_error");
}

/** The OpenAI error body. */
export function errorBody(e: ApiError): { error: { message: string; type: string; param: string | null; code: string | null } } {
  return { error: { message: e.message, type: e.type, param: e.param, code: e.code } };
}

/** Whose error shape an answer takes: the API the route belongs to. */
export type ErrorDialect = "openai" | "anthropic";

/** The dialect of a request path: Anthropic's Messages routes answer in its shape, everything else in OpenAI's. */
export function dialectOf(path: string): ErrorDialect {
  return path === "/v1/messages" || path.startsWith("/v1/messages/") ? "anthropic" : "openai";
}

/**
 * Anthropic's error type for a status. Overload keeps its HTTP status (429 with Retry-After for a full
 * queue, 503 for a node out of KV room or without the model loaded) rather than Anthropic's 529: the
 * mesh's forwarder and any proxy in between know 429/503 and retry them elsewhere, and Anthropic's SDK
 * retries them exactly as it does 529; the type still says overloaded_error.
 */
export function anthropicErrorType(status: number): string {
  switch (status) {
    case 400:
      return "invalid_request_error";
    case 401:
      return "authentication_error";
    case 403:
      return "permission_error";
    case 404:
      return "not_found_error";
    case 413:
      return "request_too_large";
    case 429:
      return "rate_limit_error";
    case 503:
    case 529:
      return "overloaded_error";
    case 504:
      return "timeout_error";
    default:
      return status >= 500 ? "api_error" : "invalid_request_error";
  }
}

/** A field path in Anthropic's style: messages[0].content[1].type -> messages.0.content.1.type. */
export function anthropicParam(param: string): string {
  return param.replace(/\[(\d+)\]/g, ".$1");
}

/** The Anthropic error body; the message names the offending field (in Anthropic's path style) when there is one. */
export function anthropicErrorBody(e: ApiError): { type: "error"; error: { type: string; message: string } } {
  let message = e.message;
  if (e.param) {
    const field = anthropicParam(e.param);
    message = message.replaceAll(e.param, field);
    if (!message.includes(field)) message = `${field}: ${message}`;
  }
  return { type: "error", error: { type: anthropicErrorType(e.status), message } };
}

/** The error body in a dialect. */
export function errorBodyIn(dialect: ErrorDialect, e: ApiError): object {
  return dialect === "anthropic" ? anthropicErrorBody(e) : errorBody(e);
}

/** A JSON Response for an ApiError, with Retry-After where it applies. */
export function errorResponse(e: ApiError, dialect: ErrorDialect = "openai"): Response {
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (e.retryAfter !== null) headers["retry-after"] = String(e.retryAfter);
  return new Response(JSON.stringify(errorBodyIn(dialect, e)), { status: e.status, headers });
}

/** How the forwarder words the answers it makes itself (a 413, a stream a peer broke off) on a route of `dialect`. */
export function forwardShape(dialect: ErrorDialect): ForwardShape | undefined {
  if (dialect === "openai") return undefined; // the forwarder's own default
  const api = (f: ErrorFields) => new ApiError(f.status, f.type, f.message, null, f.code);
  return {
    json: (f) => anthropicErrorBody(api(f)),
    sse: (f) => `event: error\ndata: ${JSON.stringify(anthropicErrorBody(api(f)))}\n\n`,
  };
}

/** JSON pointer (/messages/0/role) to OpenAI's param style (messages[0].role). */
export function pointerToParam(pointer: string): string {
  return pointer
    .split("/")
    .filter((p) => p.length > 0)
    .map((p, i) => (/^\d+$/.test(p) ? `[${p}]` : i === 0 ? p : `.${p}`))
    .join("");
}

/** A session refusal: a bad or unknown id, a full session (400: retrying will not help), or one too busy, or too many sessions (429). */
function sessionApiError(e: SessionError): ApiError {
  switch (e.code) {
    case "session_not_found":
      return new ApiError(404, "invalid_request_error", e.message, "session", e.code);
    case "session_busy":
    case "too_many_sessions":
      return new ApiError(429, "rate_limit_error", e.message, "session", e.code, 1);
    default:
      return new ApiError(400, "invalid_request_error", e.message, "session", e.code);
  }
}
