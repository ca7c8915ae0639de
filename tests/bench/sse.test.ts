import { describe, expect, test } from "bun:test";
import { sseLines } from "../../src/bench/sse";

function body(parts: string[]): ReadableStream<Uint8Array> {
  const enc = new TextEncoder();
  return new ReadableStream({
    start(c) {
      for (const p of parts) c.enqueue(enc.encode(p));
      c.close();
    },
  });
}

describe("bench SSE reader", () => {
  test("yields_data_and_error_lines_across_split_reads_and_skips_the_rest", async () => {
    const got: Array<{ field: string; payload: string }> = [];
    const stream = body([': comment\nevent: x\ndata: {"a"', ":1}\n\nerror: ", '{"message":"no"}\n', "data: [DONE]\n"]);
    for await (const { field, payload, at } of sseLines(stream)) {
      expect(at).toBeGreaterThan(0);
      got.push({ field, payload });
    }
    expect(got).toEqual([
      { field: "data", payload: '{"a":1}' },
      { field: "error", payload: '{"message":"no"}' },
      { field: "data", payload: "[DONE]" },
    ]);
  });
});
