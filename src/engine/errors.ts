/** Machine-readable reasons an engine operation failed; the server maps them to HTTP in one place. */
export type EngineErrorCode =
  | "model_load_failed"
  | "context_create_failed"
  | "context_length_exceeded"
  | "invalid_request"
  | "decode_failed"
  | "kv_exhausted"
  | "queue_full"
  | "queue_timeout"
  | "engine_busy"
  | "engine_closed"
  | "cancelled";

/** An error value with a code, safe to send between threads and to show to a user. */
export interface EngineErrorValue {
  code: EngineErrorCode;
  message: string;
  /** Seconds after which a retry may succeed, for load refusals. */
  retryAfter?: number;
}

/** Thrown by the main-thread engine API; carries the code. */
export class EngineError extends Error {
  constructor(
    readonly code: EngineErrorCode,
    message: string,
    readonly retryAfter?: number,
  ) {
    super(message);
    this.name = "EngineError";
  }

  /** Rebuild from the plain value posted by the worker. */
  static from(v: EngineErrorValue): EngineError {
    return new EngineError(v.code, v.message, v.retryAfter);
  }
}
