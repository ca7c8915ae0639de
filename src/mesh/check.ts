// Small shape checks for untrusted JSON from peers: every field is checked
// before use, so a malformed message is refused instead of throwing deep inside.

/** Whether `v` is a plain JSON object (not null, not an array). */
export function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Whether `v` is a string of 1..max characters. */
export function isStr(v: unknown, max: number): v is string {
  return typeof v === "string" && v.length > 0 && v.length <= max;
}

/** Whether `v` is a safe integer in [0, max]. */
export function isCount(v: unknown, max = Number.MAX_SAFE_INTEGER): v is number {
  return Number.isSafeInteger(v) && (v as number) >= 0 && (v as number) <= max;
}

/** Whether `v` is an array of at most `max` items. */
export function isList(v: unknown, max: number): v is unknown[] {
  return Array.isArray(v) && v.length <= max;
}

/** Lowercase hex NodeId, 32 characters. */
export function isNodeId(v: unknown): v is string {
  return typeof v === "string" && /^[0-9a-f]{32}$/.test(v);
}
