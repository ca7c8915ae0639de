// Canonical keys of chat messages, so that the same turn sent again matches
// the trie node it made: role, content, tool calls (arguments parsed as JSON,
// so whitespace and key order do not split a branch), media by digest (a huge
// inline image costs 32 hex characters, not its size), reasoning excluded
// (templates drop it from earlier turns, and clients do not send it back).
import { createHash } from "node:crypto";

/** A chat message as the session layer sees it: any JSON object with a role. */
export type SessionMessage = Record<string, unknown> & { role: string };

/** Strings longer than this (or any data: URI) are kept by digest, never verbatim, in keys and stored messages. */
export const MEDIA_INLINE_MAX = 256;

/** Fields a message's key ignores: reasoning is not replayed to the model, tool-call ids are random per generation. */
const IGNORED = new Set(["reasoning_content", "reasoning", "thinking"]);

/** sha256 of a string, hex, truncated to 32 characters (128 bits). */
export function digest(s: string): string {
  return createHash("sha256").update(s).digest("hex").slice(0, 32);
}

/** A media reference as stored: data: URIs and long strings become `sha256:<digest>`; short URLs stay. */
export function mediaRef(value: string): string {
  return value.startsWith("data:") || value.length > MEDIA_INLINE_MAX ? `sha256:${digest(value)}` : value;
}

/** JSON with object keys sorted at every level: equal values give equal text whatever the key order. */
export function canonicalJson(v: unknown): string {
  if (v === null || typeof v !== "object") return JSON.stringify(v ?? null);
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(",")}]`;
  const o = v as Record<string, unknown>;
  const keys = Object.keys(o)
    .filter((k) => o[k] !== undefined)
    .sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(o[k])}`).join(",")}}`;
}

/** Tool-call arguments as a value: parsed JSON when they parse, else the raw string. */
function parsedArguments(args: unknown): unknown {
  if (typeof args !== "string") return args ?? null;
  try {
    return { json: JSON.parse(args) };
  } catch {
    return { raw: args };
  }
}

/** A content part with its media replaced by references (media fields are the only long strings besides text). */
function partOf(part: unknown): unknown {
  if (typeof part !== "object" || part === null) return part;
  const p = part as Record<string, unknown>;
  if (p.type === "text") return { type: "text", text: p.text ?? "" };
  return shrinkMedia(p);
}

/** A copy of a value with every long or data: string replaced by its reference (recursively; the input is untouched). */
export function shrinkMedia(v: unknown): unknown {
  if (typeof v === "string") return mediaRef(v);
  if (Array.isArray(v)) return v.map(shrinkMedia);
  if (v === null || typeof v !== "object") return v;
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(v)) out[k] = shrinkMedia(x);
  return out;
}

/** The content of a message in key form: a string, or parts (text verbatim, media by reference); null and "" alike. */
function contentOf(content: unknown): unknown {
  if (content === null || content === undefined) return "";
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    // A list of only text parts renders as their concatenation in every template we ship: key it so.
    if (content.every((p) => typeof p === "object" && p !== null && (p as { type?: unknown }).type === "text")) {
      return content.map((p) => String((p as { text?: unknown }).text ?? "")).join("");
    }
    return content.map(partOf);
  }
  return shrinkMedia(content);
}

/** The canonical form of a message (what its key hashes). "developer" is keyed as "system", as templates render it. */
export function canonicalMessage(m: SessionMessage): Record<string, unknown> {
  const out: Record<string, unknown> = { role: m.role === "developer" ? "system" : m.role, content: contentOf(m.content) };
  const calls = m.tool_calls;
  if (Array.isArray(calls) && calls.length > 0) {
    out.tool_calls = calls.map((c) => {
      const fn = (c as { function?: { name?: unknown; arguments?: unknown } })?.function ?? {};
      return { name: fn.name ?? null, arguments: parsedArguments(fn.arguments) };
    });
  }
  for (const [k, v] of Object.entries(m)) {
    if (k === "role" || k === "content" || k === "tool_calls" || IGNORED.has(k) || v === undefined || v === null) continue;
    out[k] = shrinkMedia(v);
  }
  return out;
}

/** The key of a message in a session's trie: a digest of its canonical form. */
export function messageKey(m: SessionMessage): string {
  return digest(canonicalJson(canonicalMessage(m)));
}

/** The key of a request's tool definitions (empty string for none): a checkpoint made under other tools is not reused. */
export function toolsKey(tools: unknown): string {
  if (!Array.isArray(tools) || tools.length === 0) return "";
  return digest(canonicalJson(tools));
}

/** A copy of a message to store: non-text content parts by media reference, everything else verbatim, nothing shared with the caller's object. */
export function storedMessage(m: SessionMessage): SessionMessage {
  const { content, ...rest } = m;
  const copy = structuredClone(rest) as SessionMessage;
  if (Array.isArray(content)) copy.content = content.map(partOf);
  else if (content !== undefined) copy.content = typeof content === "string" || content === null ? content : shrinkMedia(content);
  return copy;
}
