// Progress output: short on a log (a line per tenth), throttled JSON lines,
// and `mesh models`' table.
import { describe, expect, test } from "bun:test";
import { formatModels } from "../../../src/cli/models";
import type { PullProgress } from "../../../src/hydration/files/download";
import { progressMode, progressPrinter } from "../../../src/hydration/files/progress";

const at = (doneBytes: number, phase: PullProgress["phase"] = "fetching"): PullProgress => ({
  phase,
  doneBytes,
  totalBytes: 1000,
  chunksDone: doneBytes / 10,
  chunks: 100,
  sources: 2,
  bytesPerSec: 1024,
});

describe("progressPrinter", () => {
  test("writes_a_line_per_tenth_when_not_on_a_terminal", () => {
    const out: string[] = [];
    const p = progressPrinter("m.gguf", { mode: progressMode(false, false), write: (s) => out.push(s) });
    for (let b = 0; b <= 1000; b += 10) p(at(b));
    p(at(1000, "done"));
    expect(out.length).toBe(12); // 0..100 % in tenths, then done
    expect(out.at(-1)).toContain("m.gguf: done 100%");
  });

  test("json_lines_come_at_most_once_a_second_and_at_each_phase", () => {
    const out: string[] = [];
    let now = 0;
    const p = progressPrinter("m.gguf", { mode: progressMode(true, true), write: (s) => out.push(s), now: () => now });
    for (let b = 0; b < 1000; b += 10) p(at(b)); // all in the same instant
    now = 1500;
    p(at(1000, "verifying"));
    p(at(1000, "done"));
    expect(out.length).toBe(3);
    expect(JSON.parse(out[2] as string)).toMatchObject({ event: "progress", phase: "done", done_bytes: 1000, total_bytes: 1000 });
  });
});

describe("formatModels", () => {
  test("lists_holders_marks_this_node_and_shows_pulls_in_progress", () => {
    const text = formatModels({
      node_id: "n1",
      mesh: [
        {
          name: "qwen",
          aliases: ["gpt-4o"],
          file: "qwen.gguf",
          size: 4 * 1024 ** 3,
          hash: "ab".repeat(32),
          chunk_size: 4 << 20,
          root: "cd".repeat(32),
          holders: [
            { id: "n1", name: "a", addr: "x:1", self: true },
            { id: "n2", name: "b", addr: "y:1", self: false },
          ],
        },
      ],
      local: [
        {
          name: "llama",
          file: "llama.gguf",
          path: "/s/models/llama.gguf",
          state: "hydrating",
          size: 100,
          hash: "ef".repeat(32),
          progress: { phase: "fetching", done_bytes: 43, total_bytes: 100, chunks_done: 1, chunks: 3, sources: 2, bytes_per_sec: 1 },
        },
      ],
    });
    expect(text).toContain("qwen (gpt-4o)  4.0 GiB  abababababababab  a*,b");
    expect(text).toContain("here");
    expect(text).toContain("pulling 43% from 2 sources");
  });
});
