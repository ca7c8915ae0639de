// Tool calls in model output -> OpenAI `tool_calls`, either on the whole text or incrementally for SSE.
//
// Formats:
// - hermes (Hermes 2/3, Qwen 2.5/3, our fallback template): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
//   any number of blocks, text allowed around them.
// - llama3 (Llama 3.1/3.2/3.3 JSON tool calling): the whole output is `{"name": ..., "parameters": {...}}`, optionally
//   after `<|python_tag|>`, possibly several objects separated by `;`.
// - auto: llama3 when the output starts with `{` (after whitespace / `<|python_tag|>`) and parses as such, hermes otherwise.
//
// Whitespace rule (the same for one-shot and streaming, so both agree exactly): whitespace right after a run of calls
// is dropped, and the whitespace right before the run is kept only if more text follows it.
// "Let me check.\n<tool_call>…</tool_call>" gives content "Let me check.".

/** One tool call found in model output; `arguments` is JSON text, as OpenAI sends it. */
export interface ParsedToolCall {
  id: string;
  name: string;
  arguments: string;
}

/** The whole output split into content and calls; content is null when the output was only calls. */
export interface ParseResult {
  content: string | null;
  toolCalls: ParsedToolCall[];
}

/** What a stream step yields: text safe to send as content now (maybe "") and the calls completed by this step. */
export interface StreamDelta {
  content: string;
  toolCalls: ParsedToolCall[];
}

/** Which tool-call syntax the model uses; pick it from the chat template when known, "auto" otherwise. */
export type ToolCallFormat = "auto" | "hermes" | "llama3";

/** Options shared by parseToolCalls and ToolCallStream. */
export interface ToolCallOptions {
  format?: ToolCallFormat;
  /** Deterministic ids `${idPrefix}0`, `${idPrefix}1`, ... (tests); default `call_` + 24 random alphanumerics. */
  idPrefix?: string;
}

const OPEN = "<tool_call>";
const CLOSE = "</tool_call>";
const PYTHON_TAG = "<|python_tag|>";
const HERMES_ARG_KEYS = ["arguments", "parameters"] as const;
const LLAMA3_ARG_KEYS = ["parameters", "arguments"] as const;
const ID_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

type NextId = () => string;
type CallBody = { name: string; arguments: string };

/** Per-parse id generator: no global counter, so parallel requests never share state. */
function idSource(prefix: string | undefined): NextId {
  if (prefix !== undefined) {
    let n = 0;
    return () => `${prefix}${n++}`;
  }
  return () => {
    let s = "call_";
    for (const b of crypto.getRandomValues(new Uint8Array(24))) s += ID_ALPHABET[b % ID_ALPHABET.length];
    return s;
  };
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

/** Name and JSON arguments from a decoded call object, or null when it does not look like a call. */
function callFromObject(v: unknown, argKeys: readonly string[], requireArgs: boolean): CallBody | null {
  if (!isPlainObject(v) || typeof v.name !== "string" || v.name === "") return null;
  const key = argKeys.find((k) => k in v);
  if (key === undefined) return requireArgs ? null : { name: v.name, arguments: "{}" };
  const args = v[key];
  if (isPlainObject(args)) return { name: v.name, arguments: JSON.stringify(args) };
  // Some models double-encode: accept a string only if it is itself a JSON object.
  if (typeof args === "string") {
    try {
      if (isPlainObject(JSON.parse(args))) return { name: v.name, arguments: args };
    } catch {
      // not JSON: not a call
    }
  }
  return null;
}

function parseHermesBody(body: string): CallBody | null {
  try {
    return callFromObject(JSON.parse(body), HERMES_ARG_KEYS, false);
  } catch {
    return null;
  }
}

function skipWs(s: string, i: number): number {
  while (i < s.length && /\s/.test(s[i] as string)) i++;
  return i;
}

/** Index just past the JSON object/array starting at `start` (brackets balanced outside strings), or -1. */
function jsonValueEnd(s: string, start: number): number {
  let depth = 0;
  let inString = false;
  for (let i = start; i < s.length; i++) {
    const ch = s[i];
    if (inString) {
      if (ch === "\\") i++;
      else if (ch === '"') inString = false;
    } else if (ch === '"') inString = true;
    else if (ch === "{" || ch === "[") depth++;
    else if (ch === "}" || ch === "]") {
      depth--;
      if (depth === 0) return i + 1;
    }
  }
  return -1;
}

/** Whether the output begins like a llama3 JSON call; "undecided" while only whitespace or part of the python tag has arrived. */
function leadingJson(s: string): "json" | "text" | "undecided" {
  let i = skipWs(s, 0);
  if (s.startsWith(PYTHON_TAG, i)) i = skipWs(s, i + PYTHON_TAG.length);
  else if (PYTHON_TAG.startsWith(s.slice(i))) return "undecided";
  if (i === s.length) return "undecided";
  return s[i] === "{" ? "json" : "text";
}

/** The llama3 form: only if the entire output is `;`-separated call objects; ids are drawn only on success. */
function parseLlama3(text: string, nextId: NextId): ParsedToolCall[] | null {
  let i = skipWs(text, 0);
  if (text.startsWith(PYTHON_TAG, i)) i = skipWs(text, i + PYTHON_TAG.length);
  const bodies: CallBody[] = [];
  while (i < text.length) {
    if (text[i] !== "{") return null;
    const end = jsonValueEnd(text, i);
    if (end < 0) return null;
    let value: unknown;
    try {
      value = JSON.parse(text.slice(i, end));
    } catch {
      return null;
    }
    const body = callFromObject(value, LLAMA3_ARG_KEYS, true);
    if (body === null) return null;
    bodies.push(body);
    i = skipWs(text, end);
    if (i < text.length) {
      if (text[i] !== ";") return null;
      i = skipWs(text, i + 1);
    }
  }
  if (bodies.length === 0) return null;
  return bodies.map((b) => ({ id: nextId(), ...b }));
}

/** Length of the longest proper prefix of `tag` that `s` ends with: text that may still become the tag. */
function partialTagLength(s: string, tag: string): number {
  for (let k = Math.min(tag.length - 1, s.length); k > 0; k--) {
    if (s.endsWith(tag.slice(0, k))) return k;
  }
  return 0;
}

/**
 * Incremental scanner for `<tool_call>` blocks. Holds back at most: a possible partial opening tag, the body of an
 * open block, and one run of whitespace (see the whitespace rule above), all of it text of this one generation.
 */
class HermesScanner {
  private pending = "";
  private inBlock = false;
  private scanFrom = 0; // where to resume looking for CLOSE in `pending`, so a long block is not rescanned per delta
  private heldWs = "";
  private afterCalls = false;
  private wsBeforeCalls = "";

  constructor(private readonly nextId: NextId) {}

  push(delta: string): StreamDelta {
    const out: StreamDelta = { content: "", toolCalls: [] };
    this.pending += delta;
    for (;;) {
      if (this.inBlock) {
        const end = this.pending.indexOf(CLOSE, this.scanFrom);
        if (end < 0) {
          this.scanFrom = Math.max(0, this.pending.length - CLOSE.length + 1);
          break;
        }
        const body = this.pending.slice(0, end);
        this.pending = this.pending.slice(end + CLOSE.length);
        this.inBlock = false;
        const call = parseHermesBody(body);
        if (call) {
          out.toolCalls.push({ id: this.nextId(), ...call });
          this.markCall();
        } else {
          out.content += this.text(OPEN + body + CLOSE);
        }
        continue;
      }
      const start = this.pending.indexOf(OPEN);
      if (start >= 0) {
        out.content += this.text(this.pending.slice(0, start));
        this.pending = this.pending.slice(start + OPEN.length);
        this.inBlock = true;
        this.scanFrom = 0;
        continue;
      }
      const cut = this.pending.length - partialTagLength(this.pending, OPEN);
      out.content += this.text(this.pending.slice(0, cut));
      this.pending = this.pending.slice(cut);
      break;
    }
    return out;
  }

  /** End of output: an unterminated block and any held text come out as content. */
  finish(): StreamDelta {
    let content = this.text(this.inBlock ? OPEN + this.pending : this.pending);
    if (!this.afterCalls) content += this.heldWs;
    this.pending = "";
    this.inBlock = false;
    this.heldWs = "";
    return { content, toolCalls: [] };
  }

  /** Content text outside calls, with trailing whitespace held until we know whether a call follows it. */
  private text(s: string): string {
    if (s === "") return "";
    if (!/\S/.test(s)) {
      this.heldWs += s;
      return "";
    }
    const lead = /^\s*/.exec(s)?.[0] ?? "";
    const trail = /\s*$/.exec(s)?.[0] ?? "";
    const core = s.slice(lead.length, s.length - trail.length);
    const before = this.afterCalls ? this.wsBeforeCalls : this.heldWs + lead;
    this.afterCalls = false;
    this.wsBeforeCalls = "";
    this.heldWs = trail;
    return before + core;
  }

  private markCall(): void {
    if (!this.afterCalls) this.wsBeforeCalls = this.heldWs;
    this.afterCalls = true;
    this.heldWs = "";
  }
}

function parseWith(text: string, format: ToolCallFormat, nextId: NextId): ParseResult {
  if (format !== "hermes" && leadingJson(text) === "json") {
    const calls = parseLlama3(text, nextId);
    if (calls) return { content: null, toolCalls: calls };
  }
  if (format === "llama3") return { content: text, toolCalls: [] };
  const scanner = new HermesScanner(nextId);
  const a = scanner.push(text);
  const b = scanner.finish();
  const content = a.content + b.content;
  return { content: content === "" && a.toolCalls.length > 0 ? null : content, toolCalls: a.toolCalls };
}

/** Split a finished model output into content and OpenAI tool calls; malformed calls stay in the content, never throws. */
export function parseToolCalls(text: string, opts: ToolCallOptions = {}): ParseResult {
  return parseWith(text, opts.format ?? "auto", idSource(opts.idPrefix));
}

/**
 * Incremental parseToolCalls for streaming: concatenating every delta's content and calls (push... then finish)
 * gives exactly the one-shot result (null content as ""). Call markup is never emitted as content; text that may
 * begin `<tool_call>` is held back until it is known. When the output starts like a llama3 JSON call (auto/llama3),
 * everything is buffered until finish(). Memory is bounded by the text of the one generation it is fed.
 */
export class ToolCallStream {
  private readonly format: ToolCallFormat;
  private readonly nextId: NextId;
  private readonly hermes: HermesScanner;
  // start: deciding whether this is a llama3 JSON call; buffer: it may be, hold all; plain: llama3 format, just text.
  private mode: "start" | "buffer" | "hermes" | "plain" | "done";
  private head = "";

  /** Same options as parseToolCalls. */
  constructor(opts: ToolCallOptions = {}) {
    this.format = opts.format ?? "auto";
    this.nextId = idSource(opts.idPrefix);
    this.hermes = new HermesScanner(this.nextId);
    this.mode = this.format === "hermes" ? "hermes" : "start";
  }

  /** Feed the next piece of generated text; returns what can be sent now. */
  push(delta: string): StreamDelta {
    switch (this.mode) {
      case "hermes":
        return this.hermes.push(delta);
      case "plain":
        return { content: delta, toolCalls: [] };
      case "buffer":
        this.head += delta;
        return { content: "", toolCalls: [] };
      case "start": {
        this.head += delta;
        const lead = leadingJson(this.head);
        if (lead === "undecided") return { content: "", toolCalls: [] };
        if (lead === "json") {
          this.mode = "buffer";
          return { content: "", toolCalls: [] };
        }
        const held = this.head;
        this.head = "";
        this.mode = this.format === "llama3" ? "plain" : "hermes";
        return this.push(held);
      }
      case "done":
        throw new Error("ToolCallStream.push() called after finish()");
    }
  }

  /** End of generation: everything still held back, decided. */
  finish(): StreamDelta {
    const mode = this.mode;
    this.mode = "done";
    switch (mode) {
      case "hermes":
        return this.hermes.finish();
      case "plain":
      case "done":
        return { content: "", toolCalls: [] };
      case "start":
      case "buffer": {
        const r = parseWith(this.head, this.format, this.nextId);
        this.head = "";
        return { content: r.content ?? "", toolCalls: r.toolCalls };
      }
    }
  }
}
