// `mesh pull <name>`: fetch a model file from the members that announce it,
// without serving it: the same resumable, verified, multi-source download
// `mesh serve --model <name>` runs, signed with the state dir's mesh
// credentials. The file lands where `mesh serve --model <name>` looks first.
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { newPullStats, pullFile } from "../hydration/files/download";
import { meshFetcher } from "../hydration/files/fetcher";
import { digestOf } from "../hydration/files/hash";
import { answersTo, type FileAnnounce } from "../hydration/files/manifest";
import { progressMode, progressPrinter } from "../hydration/files/progress";
import type { FilesReport } from "../hydration/files/service";
import { meshKeys } from "../mesh/auth";
import { MeshClient } from "../mesh/client";
import { type NodeClientFlags, nodeClient } from "./node-client";
import { modelsDir } from "./serve-files";
import { UsageError } from "./usage";

/** Options of `mesh pull`. */
export interface PullOptions extends NodeClientFlags {
  /** Folder to put the file in (default: <state dir>/models). */
  dir?: string;
  json?: boolean;
  /** Only these members (names or node ids) are asked; default: every holder. */
  from?: string[];
}

/** Run `mesh pull <name>`; resolves with the exit code. */
export async function pull(name: string, o: PullOptions): Promise<number> {
  const c = nodeClient(o);
  if (!c.creds) throw new UsageError(`pulling needs the mesh credentials: pass the node's --state-dir (an --api-key cannot fetch files)`);
  const report = (await c.get("/api/files")) as FilesReport;
  const row = report.mesh
    .filter((r) => r.holders.length > 0 && answersTo({ ...r, chunkSize: r.chunk_size }, name))
    .sort((x, y) => y.holders.length - x.holders.length)[0];
  if (!row) throw new UsageError(`no member of the mesh announces a model named '${name}' ('mesh models' lists what the mesh has)`);
  const a: FileAnnounce = {
    name: row.name,
    aliases: row.aliases,
    file: row.file,
    size: row.size,
    hash: row.hash,
    chunkSize: row.chunk_size,
    root: row.root,
  };
  const dest = resolve(join(o.dir ?? modelsDir(c.stateDir), a.file));
  const say = (event: Record<string, unknown>, text: string) =>
    o.json ? process.stdout.write(`${JSON.stringify(event)}\n`) : process.stderr.write(`${text}\n`);
  if (existsSync(dest)) {
    const d = await digestOf(c.stateDir, dest, a.chunkSize);
    if (d.hash !== a.hash)
      throw new UsageError(`${dest} exists and is not ${a.file} as the mesh has it: remove it or pull into another --dir`);
    say(
      { event: "done", path: dest, hash: a.hash, size: a.size, fetched_chunks: 0, resumed_chunks: 0 },
      `${dest} is already here and verified`,
    );
    return 0;
  }
  const from = o.from ?? [];
  const holders = row.holders
    .filter((h) => from.length === 0 || from.includes(h.name) || from.includes(h.id))
    .map((h) => ({ id: h.id, addr: h.addr, name: h.name }));
  if (holders.length === 0) {
    throw new UsageError(`none of --from ${from.join(", ")} holds ${a.file}; its holders: ${row.holders.map((h) => h.name).join(", ")}`);
  }
  say(
    { event: "start", model: a.name, file: a.file, size: a.size, hash: a.hash, holders: holders.map((h) => h.name), path: dest },
    `pulling ${a.file} (${a.size} bytes, BLAKE3 ${a.hash.slice(0, 16)}…) from ${holders.map((h) => h.name).join(", ")} into ${dest}`,
  );
  // A tool, not a member: a node id of its own, the mesh secret to sign with.
  const client = new MeshClient({ keys: meshKeys(c.creds.secret), nodeId: `cli-${randomBytes(4).toString("hex")}` });
  const stop = new AbortController();
  const onSignal = () => stop.abort();
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  try {
    const r = await pullFile({
      announce: a,
      dest,
      sources: () => holders,
      fetcher: meshFetcher(client),
      stats: newPullStats(),
      stateDir: c.stateDir,
      signal: stop.signal,
      onProgress: progressPrinter(a.file, {
        mode: progressMode(o.json === true, process.stderr.isTTY === true),
        write: (s) => (o.json ? process.stdout.write(s) : process.stderr.write(s)),
      }),
    });
    if (!r.ok) {
      if (r.code === "no_space") throw new UsageError(r.message);
      if (o.json) process.stdout.write(`${JSON.stringify({ event: "error", code: r.code, message: r.message })}\n`);
      process.stderr.write(`mesh: ${r.message}${r.code === "aborted" || r.code === "no_sources" ? " (run it again to resume)" : ""}\n`);
      return 1;
    }
    say(
      {
        event: "done",
        path: r.value.path,
        hash: a.hash,
        size: a.size,
        fetched_chunks: r.value.fetchedChunks,
        resumed_chunks: r.value.resumedChunks,
      },
      `${r.value.path}: verified (BLAKE3 ${a.hash.slice(0, 16)}…); serve it with: mesh serve --model ${a.name}`,
    );
    return 0;
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}
