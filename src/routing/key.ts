// The routing key: a chain of prefix hashes computed from the request itself,
// so any node can route a request, even one that does not serve the model and
// has no tokenizer or chat template for it.
//
// A chat request is cut into blocks: one per message, and a long message's
// content into chunks of CHUNK_CHARS characters, so a growing conversation or
// a long tool result still matches its past block by block. Block i's path
// hash stands for the whole prefix up to it:
//
//   c[i]    = wyhash over block i's pieces, seeded    (Bun.hash of each piece's UTF-8, 64 bits, the first
//             with c[i-1], each next with the last     piece seeded with c[i-1]: the prefix's fingerprint;
//                                                      c[-1] from the root)
//   root    = BLAKE3 keyed with a key derived from the mesh secret, over (kind, model, tool definitions)
//   hash[i] = first 64 bits of BLAKE3(root || c[i])    (@napi-rs/blake-hash)
//
// Only hash[i] ever leaves the node, and it is a keyed function of the
// prefix: it means nothing outside the mesh, equal text under two models (or
// two tool sets, which render at the start of the prompt) never collides. The
// fingerprints make the chain cheap (strings are hashed as they are, never
// copied into a buffer: Bun.hash reads a string as its UTF-8 whatever its
// representation, and the chain allocates nothing but the 64-bit results):
// BLAKE3 through the addon costs about
// 0.45 us a call whatever the input size (it cannot use its SIMD lanes on a
// 2 KiB block), so it runs once per block over 40 bytes, and not at all for a
// prefix seen recently (a bounded memo from c[i] to hash[i]: an agent's next
// turn re-sends its whole past). docs/benchmarks.md has the figures.
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

/** Anything that yields a request's path hashes by block (a RouteKey, or a plain list of hashes in tests). */
export interface PathKey {
  readonly length: number;
  hash(i: number): string;
}

/**
 * A request's routing key. Block fingerprints are computed up front (cheap); the published path
 * hashes are computed when asked for (one BLAKE3 each), so routing can probe the few it needs.
 */
export class RouteKey implements PathKey {
  /** Canonical characters up to the end of each block: how much of the prompt a match on hash(i) covers. */
  readonly ends: number[] = [];
  readonly spans: BlockSpan[] = [];
  /** Each block's prefix fingerprint c[i]: never published, it identifies the prefix on this node (leases). */
  readonly prefixes: bigint[] = [];
  /** Canonical characters of the whole request (the prompt-size estimate of nodes without a tokenizer). */
  chars = 0;
  /** Blocks past MAX_BLOCKS were left out. */
  truncated = false;
  private readonly computed: string[] = [];

  constructor(
    readonly model: string,
    /** The chain after the last block, so blocks can be appended (the reply) without hashing again. */
    public tail: ChainState,
    private readonly hasher: (root: Uint8Array, c: bigint) => string,
  ) {}

  /** Blocks in the key. */
  get length(): number {
    return this.prefixes.length;
  }

  /** Path hash of block i (11 base64url characters = 64 bits): the whole prefix up to that block. */
  hash(i: number): string {
    let h = this.computed[i];
    if (h === undefined) {
      h = this.hasher(this.tail.root, this.prefixes[i] as bigint);
      this.computed[i] = h;
    }
    return h;
  }

  /** Every block's path hash, in order. */
  get hashes(): readonly string[] {
    for (let i = 0; i < this.prefixes.length; i++) this.hash(i);
    return this.computed;
  }
}

/** Where a chain stands: its root (secret-keyed, per model and tools) and the fingerprint of the prefix so far. */
export interface ChainState {
  root: Uint8Array;
  c: bigint;
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

/** Slots of the memo of path hashes by prefix fingerprint (direct-mapped: a slot holds the latest prefix that maps to it). */
const MEMO_SLOTS = 65_536;
const MEMO_MASK = BigInt(MEMO_SLOTS - 1);

/** Computes routing keys under one mesh's secret. Not reentrant (shared scratch buffers); cheap to keep one per node. */
export class RouteKeyer {
  private readonly key: Buffer;
  // The fingerprint of the block fed so far, seeded with the prefix's before it.
  private acc = 0n;
  private readonly hashInput = new Uint8Array(40);
  private readonly hashInputView = new DataView(this.hashInput.buffer);
  // Roots of tool-less requests, per model: the common case costs no keyed hash.
  private readonly roots = new Map<string, Uint8Array>();
  // Agents re-send their whole past every turn: its hashes come from here. Fixed size, no allocation per entry.
  private readonly memoC = new BigUint64Array(MEMO_SLOTS);
  private readonly memoH: string[] = new Array<string>(MEMO_SLOTS).fill("");

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
      this.acc = k.tail.c;
      this.feed(prompt, from, to);
      this.push(k, { message: -1, to, last: to >= prompt.length }, to - from);
      from = to;
    }
    return k;
  }

  /** The blocks a reply adds to `key` (the assistant message as the client will send it back), as [hash, parent] pairs. */
  extend(key: RouteKey, reply: KeyMessage): Array<[string, string | null]> {
    if (key.truncated) return [];
    const k = new RouteKey(key.model, { ...key.tail }, this.hasher);
    this.message(k, reply, 0);
    let parent = key.length > 0 ? key.hash(key.length - 1) : null;
    return k.hashes.slice(0, MAX_BLOCKS - key.length).map((h) => {
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
      root = new Uint8Array(h.digestBuffer());
      if (toolText === "") {
        // Bounded: one entry per model name seen; a flood of names only refills it.
        if (this.roots.size >= 256) this.roots.clear();
        this.roots.set(`${kind}\0${model}`, root);
      }
    }
    const c = new DataView(root.buffer, root.byteOffset, 32).getBigUint64(0, true);
    return new RouteKey(model, { root, c }, this.hasher);
  }

  private message(k: RouteKey, m: KeyMessage, index: number): void {
    const role = m.role === "developer" ? "system" : m.role;
    const header =
      m.name === undefined && m.tool_call_id === undefined
        ? (PLAIN_HEADERS.get(role) ?? headerOf(role, "", ""))
        : headerOf(role, m.name ?? "", m.tool_call_id ?? "");
    // Most messages are one string: no parts to join, no media (and nothing allocated for them).
    const parts = typeof m.content === "string" ? null : contentOf(m.content);
    const text = parts === null ? (m.content as string) : parts.text;
    const media = parts === null ? NO_MEDIA : parts.media;
    this.acc = k.tail.c;
    this.feed(header, 0, header.length);
    let from = 0;
    let charsIn = header.length;
    for (;;) {
      const to = chunkEnd(text, from);
      this.feed(text, from, to);
      charsIn += to - from;
      const last = to >= text.length;
      if (last) {
        // Media is fingerprinted with the block; its size in the prompt is not knowable here, so it counts as a fixed amount.
        for (const p of media) {
          this.feed(p, 0, p.length);
          charsIn += MEDIA_CHARS;
        }
        for (const c of m.tool_calls ?? NO_CALLS) {
          const s = `\u001c${c.id}\u001f${c.function.name}\u001f${c.function.arguments}`;
          this.feed(s, 0, s.length);
          charsIn += s.length;
        }
      }
      this.push(k, { message: index, to, last }, charsIn);
      if (last || k.truncated) return;
      from = to;
      this.acc = k.tail.c;
      charsIn = 0;
    }
  }

  // Chain text[from, to)'s UTF-8 into the block being fingerprinted.
  private feed(text: string, from: number, to: number): void {
    if (to <= from) return;
    this.acc = Bun.hash.wyhash(from === 0 && to === text.length ? text : text.slice(from, to), this.acc) as bigint;
  }

  // Close the block fed so far: fingerprint it, chain it, and publish its keyed hash.
  private push(k: RouteKey, span: BlockSpan, chars: number): void {
    if (k.length >= MAX_BLOCKS) {
      k.truncated = true;
      return;
    }
    // wyhash gives an unsigned 64-bit BigInt: no masking needed.
    const c = this.acc;
    k.tail.c = c;
    k.chars += chars;
    k.prefixes.push(c);
    k.ends.push(k.chars);
    k.spans.push(span);
  }

  // hash = BLAKE3(root || c), memoised by c (which depends on the root through its seed).
  private readonly hasher = (root: Uint8Array, c: bigint): string => {
    const slot = Number(c & MEMO_MASK);
    if (this.memoC[slot] === c && this.memoH[slot] !== "") return this.memoH[slot] as string;
    this.hashInput.set(root, 0);
    this.hashInputView.setBigUint64(32, c, true);
    const h = pathHash(blake3UrlSafeBase64(this.hashInput));
    this.memoC[slot] = c;
    this.memoH[slot] = h;
    return h;
  };
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

/** A message's header block text: its role, name and tool call id between separators. */
function headerOf(role: string, name: string, toolCallId: string): string {
  return `\u001e${role}\u001f${name}\u001f${toolCallId}\u001f`;
}
const PLAIN_HEADERS = new Map(["system", "user", "assistant", "tool"].map((r) => [r, headerOf(r, "", "")]));
const NO_MEDIA: readonly string[] = [];
const NO_CALLS: NonNullable<KeyMessage["tool_calls"]> = [];

/** Characters a non-text content part counts for in the prompt-size estimate. */
const MEDIA_CHARS = 256;

/** A message's text as templates see it (text parts concatenated) and each other part as JSON (fingerprinted, not hashed apart). */
function contentOf(content: KeyMessage["content"]): { text: string; media: string[] } {
  if (content === null || content === undefined) return { text: "", media: [] };
  if (typeof content === "string") return { text: content, media: [] };
  let text = "";
  const media: string[] = [];
  for (const part of content) {
    if (part.type === "text" && typeof part.text === "string") text += part.text;
    else media.push(`\u001d${JSON.stringify(part)}`);
  }
  return { text, media };
}
