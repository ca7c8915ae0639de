// The routing key: a chain of prefix hashes computed from the request itself,
// so any node can route a request, even one that does not serve the model and
// has no tokenizer or chat template for it.
//
// A chat request is cut into blocks: one per message, and a long message's
// content into chunks of CHUNK_CHARS characters, so a growing conversation or
// a long tool result still matches its past block by block. Block i's path
// hash covers the whole prefix up to it: h[i] = BLAKE3(h[i-1] || fp(block i)),
// where h[-1] is a BLAKE3 keyed with a key derived from the mesh secret over
// (kind, model, tool definitions). So the hashes mean nothing outside the mesh,
// equal text under two models never collides, and changing the tools changes
// every hash (the tools are rendered at the start of the prompt).
//
// fp(block) is a 64-bit wyhash of the block's UTF-8 (Bun.hash): BLAKE3 over
// each 2 KiB block costs about 1.6 us through the addon (it cannot use its
// SIMD lanes on small inputs), the chain over 8-byte fingerprints about 0.5 us
// a block; docs/benchmarks.md has the figures. The secret enters through the
// keyed root, so every published hash still depends on it.
//
// Only what rendering depends on is canonicalised ("developer" is rendered as
// "system"); everything else is hashed as the client sent it, because the
// client sends the same bytes back and the prompt's tokens follow them.
import { Blake3Hasher, blake3UrlSafeBase64 } from "@napi-rs/blake-hash";

/** Characters per content chunk: the finest prefix granularity inside one long message. */
export const CHUNK_CHARS = 2048;
/** Blocks hashed per request at most; a longer prompt is routed (and marked) by its first MAX_BLOCKS blocks. */
export const MAX_BLOCKS = 1024;

/** One prefix block of a request. */
export interface BlockSpan {
  /** Index of the message (or -1: the completion prompt) whose content this block ends in. */
  message: number;
  /** Content characters of that message covered up to the end of this block. */
  to: number;
  /** Whether the block ends its message (it then also covers the message's tool calls and media). */
  last: boolean;
}

/** A request's routing key. */
export interface RouteKey {
  model: string;
  /** Path hash of each block (11 base64url characters = 64 bits), the whole prefix up to that block. */
  hashes: string[];
  /** Canonical characters up to the end of each block: how much of the prompt a match on hashes[i] covers. */
  ends: number[];
  spans: BlockSpan[];
  /** Canonical characters of the whole request (the prompt-size estimate of nodes without a tokenizer). */
  chars: number;
  /** The chain value after the last block, so blocks can be appended (the reply) without hashing again. */
  tail: string;
  /** Blocks past MAX_BLOCKS were left out. */
  truncated: boolean;
}

/** A message as the key reads it (the OpenAI shape, after schema validation). */
export interface KeyMessage {
  role: string;
  content?: string | null | ReadonlyArray<{ type: string; text?: string; [k: string]: unknown }>;
  name?: string;
  tool_calls?: ReadonlyArray<{ id: string; type: string; function: { name: string; arguments: string } }>;
  tool_call_id?: string;
}

const B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
// The 11th base64 character holds bits 60..65; a path hash keeps 64 bits, so its low two bits are cleared.
const MASK_LAST = new Map<string, string>([...B64URL].map((c, i) => [c, B64URL[i & 0x3c] as string]));

/** The 64-bit path hash of a chain value: its first 11 base64url characters, the last masked to 4 bits. */
export function pathHash(chainValue: string): string {
  return chainValue.slice(0, 10) + (MASK_LAST.get(chainValue[10] as string) ?? "A");
}

/** Write a path hash as its 8 bytes at `off`. */
export function hashToBytes(hash: string, out: Uint8Array, off: number): void {
  const b = Buffer.from(hash, "base64url");
  out.set(b.subarray(0, 8), off);
}

/** Read a path hash from 8 bytes at `off`. */
export function hashFromBytes(buf: Uint8Array, off: number): string {
  return Buffer.from(buf.buffer, buf.byteOffset + off, 8).toString("base64url");
}

/** Whether `h` is a well-formed path hash. */
export function isPathHash(h: unknown): h is string {
  return typeof h === "string" && h.length === 11 && /^[A-Za-z0-9_-]{10}[AEIMQUYcgkosw048]$/.test(h);
}

const enc = new TextEncoder();

/** Computes routing keys under one mesh's secret. Not reentrant (one scratch buffer); cheap to keep one per node. */
export class RouteKeyer {
  private readonly key: Buffer;
  private scratch = new Uint8Array(4 * CHUNK_CHARS + 256);
  private used = 0;
  private readonly mix = new Uint8Array(64);
  private readonly mixView = new DataView(this.mix.buffer);
  // Roots of tool-less requests, per model: the common case costs no keyed hash.
  private readonly roots = new Map<string, string>();

  constructor(secret: string | Uint8Array) {
    const material = typeof secret === "string" ? Buffer.from(secret, "utf8") : Buffer.from(secret);
    this.key = Blake3Hasher.deriveKey("mesh routing index v1", material);
  }

  /** The key of a chat request. */
  chat(model: string, messages: readonly KeyMessage[], tools?: unknown): RouteKey {
    const k = this.begin("chat", model, tools);
    for (let i = 0; i < messages.length && !k.truncated; i++) this.message(k, messages[i] as KeyMessage, i);
    return k;
  }

  /** The key of a completion request (its prompt text, in chunks). */
  completion(model: string, prompt: string): RouteKey {
    const k = this.begin("completion", model, undefined);
    for (let from = 0; from < prompt.length && !k.truncated; ) {
      const to = chunkEnd(prompt, from);
      this.used = 0;
      this.feed(prompt, from, to);
      this.push(k, { message: -1, to, last: to >= prompt.length }, to - from);
      from = to;
    }
    return k;
  }

  /** The blocks a reply adds to `key` (the assistant message as the client will send it back), as [hash, parent] pairs. */
  extend(key: RouteKey, reply: KeyMessage): Array<[string, string | null]> {
    if (key.truncated) return [];
    const k: RouteKey = { ...key, hashes: [], ends: [], spans: [] };
    this.message(k, reply, 0);
    let parent = key.hashes.length > 0 ? (key.hashes[key.hashes.length - 1] as string) : null;
    return k.hashes.slice(0, MAX_BLOCKS - key.hashes.length).map((h) => {
      const pair: [string, string | null] = [h, parent];
      parent = h;
      return pair;
    });
  }

  private begin(kind: string, model: string, tools: unknown): RouteKey {
    const toolText = tools === undefined || tools === null ? "" : JSON.stringify(tools);
    let root = toolText === "" ? this.roots.get(`${kind}\0${model}`) : undefined;
    if (root === undefined) {
      const h = Blake3Hasher.newKeyed(this.key);
      h.update(`mesh/route/v1\0${kind}\0${model}\0`);
      if (toolText !== "") h.update(toolText);
      root = h.digest("base64");
      if (toolText === "") {
        // Bounded: one entry per model name seen; a flood of names only refills it.
        if (this.roots.size >= 256) this.roots.clear();
        this.roots.set(`${kind}\0${model}`, root);
      }
    }
    return { model, hashes: [], ends: [], spans: [], chars: 0, tail: root, truncated: false };
  }

  private message(k: RouteKey, m: KeyMessage, index: number): void {
    const role = m.role === "developer" ? "system" : m.role;
    const header = `\u001e${role}\u001f${m.name ?? ""}\u001f${m.tool_call_id ?? ""}\u001f`;
    const { text, media } = contentOf(m.content);
    this.used = 0;
    this.feed(header, 0, header.length);
    let from = 0;
    let charsIn = header.length;
    for (;;) {
      const to = chunkEnd(text, from);
      this.feed(text, from, to);
      charsIn += to - from;
      const last = to >= text.length;
      if (last) {
        for (const p of media) {
          this.feed(p, 0, p.length);
          charsIn += p.length;
        }
        for (const c of m.tool_calls ?? []) {
          const s = `\u001c${c.id}\u001f${c.function.name}\u001f${c.function.arguments}`;
          this.feed(s, 0, s.length);
          charsIn += s.length;
        }
      }
      this.push(k, { message: index, to, last }, charsIn);
      if (last || k.truncated) return;
      from = to;
      this.used = 0;
      charsIn = 0;
    }
  }

  // Append text[from, to) as UTF-8 to the block being fingerprinted.
  private feed(text: string, from: number, to: number): void {
    if (to <= from) return;
    const s = from === 0 && to === text.length ? text : text.slice(from, to);
    const need = this.used + 3 * s.length;
    if (need > this.scratch.length) {
      const bigger = new Uint8Array(Math.max(need, 2 * this.scratch.length));
      bigger.set(this.scratch.subarray(0, this.used));
      this.scratch = bigger;
    }
    this.used += enc.encodeInto(s, this.scratch.subarray(this.used)).written;
  }

  // Close the block fed so far: fingerprint it and chain it onto the key.
  private push(k: RouteKey, span: BlockSpan, chars: number): void {
    if (k.hashes.length >= MAX_BLOCKS) {
      k.truncated = true;
      return;
    }
    const fp = Bun.hash(this.scratch.subarray(0, this.used)) as bigint;
    const n = enc.encodeInto(k.tail, this.mix).written;
    this.mixView.setBigUint64(n, BigInt.asUintN(64, fp), true);
    k.tail = blake3UrlSafeBase64(this.mix.subarray(0, n + 8));
    k.chars += chars;
    k.hashes.push(pathHash(k.tail));
    k.ends.push(k.chars);
    k.spans.push(span);
    // A huge header or media digest list must not keep a huge scratch alive.
    if (this.scratch.length > 64 * CHUNK_CHARS) this.scratch = new Uint8Array(4 * CHUNK_CHARS + 256);
  }
}

/** End of the chunk starting at `from`: CHUNK_CHARS on, never splitting a surrogate pair. */
function chunkEnd(text: string, from: number): number {
  let to = Math.min(text.length, from + CHUNK_CHARS);
  if (to < text.length) {
    const c = text.charCodeAt(to - 1);
    if (c >= 0xd800 && c <= 0xdbff) to++;
  }
  return to;
}

/** A message's text as templates see it (text parts concatenated) and a digest per other part. */
function contentOf(content: KeyMessage["content"]): { text: string; media: string[] } {
  if (content === null || content === undefined) return { text: "", media: [] };
  if (typeof content === "string") return { text: content, media: [] };
  let text = "";
  const media: string[] = [];
  for (const part of content) {
    if (part.type === "text" && typeof part.text === "string") text += part.text;
    // Media by digest: a data URL can be megabytes, and only its identity matters.
    else media.push(`\u001d${blake3UrlSafeBase64(JSON.stringify(part))}`);
  }
  return { text, media };
}
