// Past responses, for `previous_response_id` and GET / DELETE /v1/responses/{id}:
// in memory, per node, bounded by count and by bytes, least recently used out
// first. Each entry holds the response object as it was answered and the
// conversation it ended, as the chat messages it translates to (its input,
// without instructions, then its output), so a request that names it prepends
// that conversation and runs as one self-contained chat request.
import { LruMap } from "../../lru";
import type { ChatBodyT } from "../openai/schema";

/** A chat message, as stored. */
export type ChatMessageT = ChatBodyT["messages"][number];

/** At most this many responses are kept, whatever their size. */
export const RESPONSE_STORE_MAX_ENTRIES = 1024;
/** Default byte bound of the store (`mesh serve --responses-store <MiB>`). */
export const RESPONSE_STORE_DEFAULT_MIB = 64;

/** A response the store keeps. */
export interface StoredResponse {
  /** The response object as answered (what GET /v1/responses/{id} returns). */
  readonly response: object;
  /** The conversation up to and including this response's output, as chat messages; instructions are not part of it. */
  readonly conversation: readonly ChatMessageT[];
  /** JSON bytes of `conversation`. */
  readonly conversationBytes: number;
  /** What the entry counts against the bound: its conversation and its response object. */
  readonly bytes: number;
}

/** JSON size in bytes of a value (a response, a list of messages). */
export function jsonBytes(value: unknown): number {
  return Buffer.byteLength(JSON.stringify(value), "utf8");
}

/**
 * The bounded store. Entries of one conversation share their message objects, but each counts its
 * whole conversation against the bound: an entry keeps its messages alive whatever happens to the
 * entries before it, so that is what it may cost.
 */
export class ResponseStore {
  private readonly entries = new LruMap<string, StoredResponse>();
  private total = 0;

  constructor(
    readonly maxBytes: number,
    readonly maxEntries = RESPONSE_STORE_MAX_ENTRIES,
  ) {}

  /** Responses held. */
  get size(): number {
    return this.entries.size;
  }

  /** Bytes counted against the bound. */
  get bytes(): number {
    return this.total;
  }

  /** The response `id`, leaving its recency alone (a request being checked may still be refused). */
  peek(id: string): StoredResponse | undefined {
    return this.entries.peek(id);
  }

  /** The response `id`, made the most recent. */
  get(id: string): StoredResponse | undefined {
    return this.entries.get(id);
  }

  /**
   * Keep a response: `added` holds the messages its input and output added to `prior`, the stored
   * response it continued (if any). Least recently used entries go until it fits; one larger than the
   * whole bound is not kept (false).
   */
  add(id: string, response: object, added: readonly ChatMessageT[], prior?: { id: string; stored: StoredResponse }): boolean {
    const conversationBytes = (prior?.stored.conversationBytes ?? 0) + jsonBytes(added);
    const bytes = conversationBytes + jsonBytes(response);
    if (bytes > this.maxBytes || this.maxEntries <= 0) return false;
    this.delete(id);
    // The response it continued was just used: it goes after those that were not.
    if (prior) this.entries.get(prior.id);
    while (this.entries.size > 0 && (this.total + bytes > this.maxBytes || this.entries.size >= this.maxEntries)) {
      const [, old] = this.entries.shift() as [string, StoredResponse];
      this.total -= old.bytes;
    }
    const conversation = prior ? [...prior.stored.conversation, ...added] : [...added];
    this.entries.set(id, { response, conversation, conversationBytes, bytes });
    this.total += bytes;
    return true;
  }

  /** Remove `id`; true when it was held. */
  delete(id: string): boolean {
    const old = this.entries.peek(id);
    if (!old) return false;
    this.entries.delete(id);
    this.total -= old.bytes;
    return true;
  }
}
