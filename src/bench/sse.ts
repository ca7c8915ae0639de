// Server-sent events as the benchmarks read them: each `data:` (or llama-server's `error:`)
// line of a streamed answer, with the time its bytes arrived (first-token timing needs that).

/** One event line: its field (`data` or `error`), its payload, and when its bytes were read. */
export interface SseLine {
  field: "data" | "error";
  payload: string;
  at: number;
}

/** The `data:` and `error:` lines of a streamed body, in order, each stamped with performance.now() of its read. */
export async function* sseLines(body: ReadableStream<Uint8Array>): AsyncGenerator<SseLine> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    const at = performance.now();
    buf += decoder.decode(value, { stream: true });
    let nl = buf.indexOf("\n");
    while (nl >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      nl = buf.indexOf("\n");
      if (line.startsWith("data:")) yield { field: "data", payload: line.slice(5).trim(), at };
      else if (line.startsWith("error:")) yield { field: "error", payload: line.slice(6).trim(), at };
    }
  }
}
