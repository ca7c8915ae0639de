// The one place where error values become HTTP responses in OpenAI's shape:
// {"error": {"message", "type", "param", "code"}}. Nothing here ever puts a
// stack trace in a response.
import { EngineError } from "../engine/errors";
import { ForwardError } from "./forward";

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

/** A JSON Response for an ApiError, with Retry-After where it applies. */
export function errorResponse(e: ApiError): Response {
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (e.retryAfter !== null) headers["retry-after"] = String(e.retryAfter);
  return new Response(JSON.stringify(errorBody(e)), { status: e.status, headers });
}

/** JSON pointer (/messages/0/role) to OpenAI's param style (messages[0].role). */
export function pointerToParam(pointer: string): string {
  return pointer
    .split("/")
    .filter((p) => p.length > 0)
    .map((p, i) => (/^\d+$/.test(p) ? `[${p}]` : i === 0 ? p : `.${p}`))
    .join("");
}
