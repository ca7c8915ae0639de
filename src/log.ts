// Structured, bounded logging: one JSON object per line (--log-format json) or
// readable text. Callers pass fields, never prompt text, at info level.

export type LogFormat = "text" | "json";
export type LogLevel = "debug" | "info" | "warn" | "error";

const ORDER: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };
// One line never grows without bound, whatever a field holds.
const MAX_FIELD = 512;

/** A logger writing to stderr. */
export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
}

function clip(v: unknown): unknown {
  if (typeof v === "string" && v.length > MAX_FIELD) return `${v.slice(0, MAX_FIELD)}…`;
  return v;
}

/** Create a logger; sink defaults to stderr (tests pass their own). */
export function createLogger(
  format: LogFormat = "text",
  min: LogLevel = "info",
  sink: (line: string) => void = (l) => process.stderr.write(l),
): Logger {
  const emit = (level: LogLevel, msg: string, fields: Record<string, unknown> = {}) => {
    if (ORDER[level] < ORDER[min]) return;
    const clipped = Object.fromEntries(Object.entries(fields).map(([k, v]) => [k, clip(v)]));
    if (format === "json") {
      sink(`${JSON.stringify({ time: new Date().toISOString(), level, msg: clip(msg), ...clipped })}\n`);
    } else {
      const kv = Object.entries(clipped)
        .map(([k, v]) => `${k}=${typeof v === "string" && !/\s/.test(v) ? v : JSON.stringify(v)}`)
        .join(" ");
      sink(`${new Date().toISOString().slice(11, 19)} ${level.padEnd(5)} ${msg}${kv ? ` ${kv}` : ""}\n`);
    }
  };
  return {
    debug: (m, f) => emit("debug", m, f),
    info: (m, f) => emit("info", m, f),
    warn: (m, f) => emit("warn", m, f),
    error: (m, f) => emit("error", m, f),
  };
}

/** A logger that drops everything. */
export const silentLogger: Logger = createLogger("text", "error", () => {});
