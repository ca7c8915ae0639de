// Where each block of a routing key ends in the prompt text the engine gets,
// so the engine can tell which blocks its KV holds (a block is held once the
// tokens covering its end are in KV). Chat templates wrap messages in their
// own markup and some trim or rewrite content, so each message's text is
// looked for in the rendered prompt. A block whose end cannot be placed
// exactly is placed at the next end that can (at the latest, the end of the
// prompt): later, never earlier, so a node never claims a block its KV does
// not hold.
import type { KeyMessage, RouteKey } from "./key";

/** A block's hash, the hash before it, and the UTF-8 byte offset in the prompt where it ends. */
export interface BlockAnchor {
  hash: string;
  parent: string | null;
  byteEnd: number;
}

/**
 * Anchors of a chat key's blocks in `rendered` (the prompt produced from the same messages).
 * Messages are looked for from the last to the first, each at its last occurrence ending before
 * where the next one was found: the text of a short message ("ok", "user", a number) also occurs
 * in the template's markup and in tool calls before it, and a forward search would take that
 * earlier occurrence. Looking backwards, each message is found at or after where it really is
 * (by induction from the end), so no block is ever placed before its real end.
 */
export function chatAnchors(key: RouteKey, messages: readonly KeyMessage[], rendered: string): BlockAnchor[] {
  // Where each message's text starts in the rendered prompt (-1: not found), and its length there.
  const starts: number[] = new Array(messages.length).fill(-1);
  const found: number[] = new Array(messages.length).fill(0);
  let bound = rendered.length;
  for (let i = messages.length - 1; i >= 0; i--) {
    const text = textOf((messages[i] as KeyMessage).content);
    if (text.length === 0) continue;
    let at = lastBefore(rendered, text, bound);
    if (at >= 0) {
      starts[i] = at;
      found[i] = text.length;
      bound = at;
      continue;
    }
    // Templates often trim content: find the trimmed text, and count offsets from where the untrimmed one would start.
    const trimmed = text.trim();
    const lead = text.length - text.trimStart().length;
    at = trimmed.length > 0 ? lastBefore(rendered, trimmed, bound) : -1;
    if (at >= 0) {
      starts[i] = at - lead;
      found[i] = trimmed.length + lead;
      bound = at;
    }
  }
  const ends: number[] = key.spans.map((s) => {
    if (s.message < 0) return -1;
    const start = starts[s.message] ?? -1;
    if (start < 0) return -1;
    const m = messages[s.message] as KeyMessage;
    const hasMore = (m.tool_calls?.length ?? 0) > 0 || hasMedia(m.content);
    // Past the content the template renders tool calls its own way: place that block at the next anchor.
    if (s.last && hasMore) return -1;
    return start + Math.min(s.to, found[s.message] ?? 0);
  });
  return toAnchors(key, ends, rendered);
}

/** Start of the last occurrence of `text` in `s` that ends at or before `bound`, or -1. */
function lastBefore(s: string, text: string, bound: number): number {
  const from = bound - text.length;
  return from < 0 ? -1 : s.lastIndexOf(text, from);
}

/** Anchors of a completion key's blocks: the prompt is the text itself. */
export function completionAnchors(key: RouteKey, prompt: string): BlockAnchor[] {
  return toAnchors(
    key,
    key.spans.map((s) => s.to),
    prompt,
  );
}

// Character ends -> byte ends, each unknown end (-1) taking the next known one, in one pass over the text.
function toAnchors(key: RouteKey, charEnds: number[], text: string): BlockAnchor[] {
  const fixed = charEnds.slice();
  let next = text.length;
  for (let i = fixed.length - 1; i >= 0; i--) {
    const e = Math.min(fixed[i] as number, text.length);
    if (e < 0) fixed[i] = next;
    else next = fixed[i] = e;
  }
  // Ends never decrease along the chain (a block is never held before the one it extends): raise, never lower.
  for (let i = 1; i < fixed.length; i++) fixed[i] = Math.max(fixed[i] as number, fixed[i - 1] as number);
  const out: BlockAnchor[] = [];
  let bytes = 0;
  let at = 0;
  for (let i = 0; i < fixed.length; i++) {
    const e = fixed[i] as number;
    if (e > at) {
      bytes += Buffer.byteLength(text.slice(at, e), "utf8");
      at = e;
    }
    out.push({ hash: key.hashes[i] as string, parent: i > 0 ? (key.hashes[i - 1] as string) : null, byteEnd: bytes });
  }
  return out;
}

function textOf(content: KeyMessage["content"]): string {
  if (content === null || content === undefined) return "";
  if (typeof content === "string") return content;
  let t = "";
  for (const p of content) if (p.type === "text" && typeof p.text === "string") t += p.text;
  return t;
}

function hasMedia(content: KeyMessage["content"]): boolean {
  return Array.isArray(content) && content.some((p) => p.type !== "text");
}
