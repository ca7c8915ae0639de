// Download progress for a person or a script: a bar redrawn in place on a
// terminal, a plain line every tenth otherwise (logs stay short), or one JSON
// object per line (at most one a second, and at every phase change).
import type { PullProgress } from "./download";
import { formatBytes } from "./limiter";

/** How progress is shown. */
export interface ProgressOptions {
  /** "bar" on a terminal, "lines" otherwise, "json" for scripts. */
  mode: "bar" | "lines" | "json";
  write: (s: string) => void;
  now?: () => number;
}

/** The mode for a stream: a bar on a TTY, else lines; json when asked. */
export function progressMode(json: boolean, tty: boolean): ProgressOptions["mode"] {
  return json ? "json" : tty ? "bar" : "lines";
}

/** A progress callback printing for `label` (the file's name). */
export function progressPrinter(label: string, o: ProgressOptions): (p: PullProgress) => void {
  const now = o.now ?? Date.now;
  let lastTenth = -1;
  let lastPhase = "";
  let lastAt = 0;
  return (p) => {
    const f = p.totalBytes > 0 ? p.doneBytes / p.totalBytes : 1;
    const pct = Math.floor(f * 100);
    const rate = `${formatBytes(Math.round(p.bytesPerSec))}/s`;
    const phaseChanged = p.phase !== lastPhase;
    lastPhase = p.phase;
    if (o.mode === "json") {
      if (!phaseChanged && now() - lastAt < 1000) return;
      lastAt = now();
      o.write(
        `${JSON.stringify({ event: "progress", file: label, phase: p.phase, done_bytes: p.doneBytes, total_bytes: p.totalBytes, chunks_done: p.chunksDone, chunks: p.chunks, sources: p.sources, bytes_per_sec: Math.round(p.bytesPerSec) })}\n`,
      );
      return;
    }
    if (o.mode === "bar") {
      if (!phaseChanged && now() - lastAt < 100 && p.phase !== "done") return;
      lastAt = now();
      const width = 30;
      const fill = Math.round(f * width);
      const tail = p.phase === "verifying" ? "verifying" : `${p.sources} source${p.sources === 1 ? "" : "s"}, ${rate}`;
      o.write(
        `\r${label} [${"#".repeat(fill)}${" ".repeat(width - fill)}] ${String(pct).padStart(3)}% ${formatBytes(p.doneBytes)}/${formatBytes(p.totalBytes)} ${tail}\x1b[K${p.phase === "done" ? "\n" : ""}`,
      );
      return;
    }
    const tenth = Math.floor(f * 10);
    if (tenth === lastTenth && !phaseChanged) return;
    lastTenth = tenth;
    o.write(
      `${label}: ${p.phase} ${pct}% (${formatBytes(p.doneBytes)} of ${formatBytes(p.totalBytes)}, ${p.sources} source${p.sources === 1 ? "" : "s"}, ${rate})\n`,
    );
  };
}
