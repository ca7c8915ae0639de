// The resumable state of a download: `<file>.part` holds the bytes, and
// `<file>.part.json` names the file (hash, size, chunk size, root) and which
// chunks were verified and written. Only a chunk whose bytes are already in
// the .part file is ever listed, and the finished file is checked whole
// before it is renamed into place, so neither a crash nor a lie makes a
// partial file pass for a whole one.
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { isObject } from "../../mesh/check";
import { chunkCount, type FileAnnounce } from "./manifest";

/** Paths of a download's partial file and its sidecar. */
export function partPaths(dest: string): { part: string; sidecar: string } {
  return { part: `${dest}.part`, sidecar: `${dest}.part.json` };
}

/** Which chunks of a file are verified on disk. */
export class ChunkSet {
  readonly bits: Uint8Array;
  private n = 0;

  constructor(readonly total: number) {
    this.bits = new Uint8Array(Math.ceil(total / 8));
  }

  has(i: number): boolean {
    return ((this.bits[i >> 3] ?? 0) & (1 << (i & 7))) !== 0;
  }

  add(i: number): void {
    if (this.has(i)) return;
    this.bits[i >> 3] = (this.bits[i >> 3] ?? 0) | (1 << (i & 7));
    this.n++;
  }

  delete(i: number): void {
    if (!this.has(i)) return;
    this.bits[i >> 3] = (this.bits[i >> 3] ?? 0) & ~(1 << (i & 7));
    this.n--;
  }

  /** Chunks held. */
  get size(): number {
    return this.n;
  }
}

/** The chunks a previous run verified for this very file, or an empty set when there is nothing usable to resume. */
export function loadSidecar(dest: string, a: FileAnnounce): ChunkSet {
  const n = chunkCount(a.size, a.chunkSize);
  const fresh = new ChunkSet(n);
  const { part, sidecar } = partPaths(dest);
  if (!existsSync(part) || !existsSync(sidecar)) return fresh;
  try {
    if (statSync(part).size !== a.size) return fresh;
    const v = JSON.parse(readFileSync(sidecar, "utf8")) as unknown;
    if (!isObject(v) || v.v !== 1 || v.hash !== a.hash || v.size !== a.size || v.chunkSize !== a.chunkSize || v.root !== a.root)
      return fresh;
    if (typeof v.done !== "string") return fresh;
    const bits = Buffer.from(v.done, "base64");
    if (bits.length !== fresh.bits.length) return fresh;
    for (let i = 0; i < n; i++) if ((bits[i >> 3] ?? 0) & (1 << (i & 7))) fresh.add(i);
    return fresh;
  } catch {
    return new ChunkSet(n);
  }
}

/** Write the sidecar (atomically: a crash leaves the old one or the new one). */
export function saveSidecar(dest: string, a: FileAnnounce, done: ChunkSet): void {
  const { sidecar } = partPaths(dest);
  const text = JSON.stringify({
    v: 1,
    hash: a.hash,
    size: a.size,
    chunkSize: a.chunkSize,
    root: a.root,
    done: Buffer.from(done.bits).toString("base64"),
  });
  writeFileSync(`${sidecar}.tmp`, text, { mode: 0o600 });
  renameSync(`${sidecar}.tmp`, sidecar);
}

/** Remove a download's partial state. */
export function dropPartial(dest: string): void {
  const { part, sidecar } = partPaths(dest);
  for (const p of [part, sidecar, `${sidecar}.tmp`]) rmSync(p, { force: true });
}

/**
 * Take `<dest>.part.lock` for this download (the file holds its process id): two downloads of one file at once
 * (`mesh pull` beside a `mesh serve --model` pulling it) would truncate each other's part file and the second to
 * finish would fail on the first one's rename. A lock left by a process that no longer runs is taken over.
 * Returns the release function, or the process id of the download that holds it.
 */
export function lockPartial(dest: string): { release: () => void } | { heldBy: number } {
  const path = `${partPaths(dest).part}.lock`;
  const ours = heldHere.has(path);
  const token = `${process.pid} ${randomBytes(8).toString("hex")}`;
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      writeFileSync(path, token, { flag: "wx", mode: 0o600 });
      heldHere.add(path);
      return {
        release: () => {
          heldHere.delete(path);
          try {
            if (readFileSync(path, "utf8") === token) rmSync(path, { force: true });
          } catch {
            // already gone
          }
        },
      };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
    }
    let pid = 0;
    try {
      pid = Number.parseInt(readFileSync(path, "utf8"), 10);
    } catch {
      continue; // released meanwhile: try again
    }
    // Our own pid on a lock this process does not hold: an earlier life under the same pid (pid 1 in a container).
    const stale = pid === process.pid ? !ours : !(Number.isSafeInteger(pid) && pid > 0 && alive(pid));
    if (!stale) return { heldBy: pid };
    rmSync(path, { force: true }); // its process is gone (killed mid-pull): the lock is stale
  }
  return { heldBy: 0 };
}

/** Locks this process holds now. */
const heldHere = new Set<string>();

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}
