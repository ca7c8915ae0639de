// Incremental text output of one generation: UTF-8-safe byte decoding and
// stop strings that are never emitted, even when split across tokens.

/** Length of the longest prefix of bytes that ends on a complete UTF-8 character. */
export function completeUtf8Length(bytes: Uint8Array): number {
  const n = bytes.length;
  // A character is at most 4 bytes: only the last 3 can start an unfinished one.
  for (let back = 1; back <= Math.min(3, n); back++) {
    const b = bytes[n - back] as number;
    if ((b & 0xc0) === 0x80) continue; // continuation byte: keep looking for the lead
    const need = b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : b >= 0xc0 ? 2 : 1;
    return need > back ? n - back : n;
  }
  return n;
}

/** Turns token pieces (bytes) into text, holding back an unfinished UTF-8 character. */
export class Utf8Stream {
  private pending = new Uint8Array(0);
  private readonly decoder = new TextDecoder("utf-8");

  /** Add bytes; returns the text that is now complete. */
  push(bytes: Uint8Array): string {
    let all = bytes;
    if (this.pending.length > 0) {
      all = new Uint8Array(this.pending.length + bytes.length);
      all.set(this.pending);
      all.set(bytes, this.pending.length);
    }
    const cut = completeUtf8Length(all);
    this.pending = all.slice(cut);
    return this.decoder.decode(all.subarray(0, cut));
  }

  /** Whatever is left at the end (an invalid tail becomes U+FFFD). */
  flush(): string {
    const rest = this.pending;
    this.pending = new Uint8Array(0);
    return rest.length > 0 ? this.decoder.decode(rest) : "";
  }
}

/** Result of feeding text to a StopMatcher. */
export interface StopResult {
  /** Text safe to emit now. */
  text: string;
  /** True when a stop string was found; text ends right before it. */
  stopped: boolean;
}

/** Holds back text that could still become a stop string; cuts the output before the first one found. */
export class StopMatcher {
  private held = "";
  /** The stop string that cut the output, once one has. */
  matched: string | null = null;
  constructor(private readonly stops: readonly string[]) {}

  /** Feed new text. */
  push(text: string): StopResult {
    if (this.stops.length === 0) return { text, stopped: false };
    const buf = this.held + text;
    let first = -1;
    for (const s of this.stops) {
      const i = buf.indexOf(s);
      if (i >= 0 && (first < 0 || i < first)) {
        first = i;
        this.matched = s;
      }
    }
    if (first >= 0) {
      this.held = "";
      return { text: buf.slice(0, first), stopped: true };
    }
    let keep = 0;
    for (const s of this.stops) {
      for (let k = Math.min(s.length - 1, buf.length); k > keep; k--) {
        if (buf.endsWith(s.slice(0, k))) {
          keep = k;
          break;
        }
      }
    }
    this.held = buf.slice(buf.length - keep);
    return { text: buf.slice(0, buf.length - keep), stopped: false };
  }

  /** Text held back at the end of generation (it did not become a stop string). */
  flush(): string {
    const t = this.held;
    this.held = "";
    return t;
  }
}
