import type { RequestRecord } from "../../src/bench/drive";

/** One benchmark request's record: a plain successful turn unless `p` says otherwise. */
export function requestRecord(p: Partial<RequestRecord> & Pick<RequestRecord, "loop" | "turn">): RequestRecord {
  return {
    kind: "turn",
    stream: false,
    startMs: 0,
    endMs: 100,
    attempts: 1,
    status429: 0,
    waitedMs: 0,
    status: 200,
    ok: true,
    ttftMs: null,
    e2eMs: 100,
    usage: { promptTokens: 1000, cachedTokens: 0, completionTokens: 8 },
    error: null,
    streamError: false,
    ...p,
  };
}
