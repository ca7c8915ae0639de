// A node's model files, assembled: what it offers (the shelf, announced as
// `file:{hash}` records), what the mesh offers (everyone's records, with the
// live members that hold each), the downloads it runs, and the figures for
// /metrics and `mesh models`.
import { basename } from "node:path";
import type { Logger } from "../../log";
import type { MeshCore } from "../../mesh/node";
import type { FileHooks } from "../../server/mesh";
import { type ChunkFetcher, newPullStats, type PullProgress, type PullResult, type PullStats, pullFile, type Source } from "./download";
import { cachedDigest, digestOf } from "./hash";
import { answersTo, FILE_PREFIX, type FileAnnounce, fileKey, isFileName, parseAnnounce, serializeAnnounce } from "./manifest";
import { Shelf } from "./upload";

/** One file the mesh announces, with its live holders. */
export interface MeshFileRow {
  name: string;
  aliases: string[];
  file: string;
  size: number;
  hash: string;
  chunk_size: number;
  root: string;
  holders: Array<{ id: string; name: string; addr: string; self: boolean }>;
}

/** A download's figures, as reported. */
export interface ProgressRow {
  phase: PullProgress["phase"];
  done_bytes: number;
  total_bytes: number;
  chunks_done: number;
  chunks: number;
  sources: number;
  bytes_per_sec: number;
}

/** One model file of this node. */
export interface LocalFileRow {
  name: string;
  file: string;
  path: string;
  /** hashing: being hashed to be announced; announced: offered to peers; waiting: no holder yet; hydrating; failed. */
  state: "hashing" | "announced" | "waiting" | "hydrating" | "failed";
  size: number | null;
  hash: string | null;
  progress: ProgressRow | null;
  error?: string;
}

/** The answer of GET /api/files. */
export interface FilesReport {
  node_id: string;
  local: LocalFileRow[];
  mesh: MeshFileRow[];
}

/** What the service needs. */
export interface FileServiceOptions {
  selfId: string;
  stateDir: string;
  uploadLimit: number;
  chunkSize: number;
  fetcher: ChunkFetcher;
  log: Logger;
  /** Test fault only: this node's uploads lie (a byte of every chunk flipped). */
  corruptUploads?: boolean;
}

/** Most local rows kept (one per model this node serves or pulled). */
const MAX_LOCAL = 64;

/** Files of one node. */
export class FileService implements FileHooks {
  readonly shelf: Shelf;
  readonly stats: PullStats = newPullStats();
  private core: MeshCore | null = null;
  private readonly local = new Map<string, LocalFileRow>();

  constructor(private readonly o: FileServiceOptions) {
    this.shelf = new Shelf({ uploadLimit: o.uploadLimit, corruptUploads: o.corruptUploads });
  }

  /** Use the started mesh core's store and members. */
  attach(core: MeshCore): void {
    this.core = core;
    // Records written before attach (none today) and every announced file go out now.
    for (const f of this.shelf.list()) this.publish(f.announce);
    // A record of ours from an earlier life of this node (peers keep it over a quick restart) for a file not offered
    // now is deleted: else pullers keep asking this node for a file it answers 404 to. Those here now, and those to come.
    core.extend({
      types: [],
      handle: () => ({ type: "error", code: "unknown_type", message: "no such message" }),
      onStoreChange: (owner, key) => {
        if (owner === core.id && key.startsWith(FILE_PREFIX)) queueMicrotask(() => this.dropStale(key));
      },
    });
    for (const r of [...core.store.live(FILE_PREFIX)]) if (r.owner === core.id) this.dropStale(r.key);
  }

  /** Delete our record under `key` if it is live and names no file on the shelf. */
  private dropStale(key: string): void {
    const core = this.core;
    const r = core?.store.get(core.id, key);
    if (!core || !r || r.value === null) return;
    if (this.shelf.has(key.slice(FILE_PREFIX.length))) return;
    core.store.delete(key);
    this.o.log.info("deleted a file record of an earlier run: this node no longer offers that file", { key: key.slice(0, 24) });
  }

  /** Hash `path` (or take its cached digest), offer it to peers and announce it under `name` and `aliases`. */
  async offer(path: string, name: string, aliases: string[]): Promise<FileAnnounce | null> {
    const row = this.row({ name, file: basename(path), path, state: "hashing", size: null, hash: null, progress: null });
    if (!isFileName(basename(path))) {
      // Peers would refuse the record: a file name is all they store the file under, so it must be a safe one.
      const error = "the file name must be letters, digits, '.', '_', '+' or '-' (rename the file to offer it to peers)";
      Object.assign(row, { state: "failed", error });
      this.o.log.warn("model file not announced", { model: name, file: basename(path), error });
      return null;
    }
    try {
      const d = await digestOf(this.o.stateDir, path, this.o.chunkSize, { anyChunking: true });
      const announce: FileAnnounce = {
        name,
        aliases,
        file: basename(path),
        size: d.size,
        hash: d.hash,
        chunkSize: d.chunkSize,
        root: d.root,
      };
      this.shelf.add({ path, announce, manifest: { hash: d.hash, size: d.size, chunkSize: d.chunkSize, chunks: d.chunks } });
      Object.assign(row, { state: "announced", size: d.size, hash: d.hash });
      this.publish(announce);
      this.o.log.info("model file announced", { model: name, size: d.size, hash: d.hash.slice(0, 16), chunks: d.chunks.length });
      return announce;
    } catch (e) {
      Object.assign(row, { state: "failed", error: (e as Error).message });
      this.o.log.warn("cannot announce the model file", { model: name, error: (e as Error).message });
      return null;
    }
  }

  /** The announcement for `name` held by the most live peers (other than this node), with those peers; null if none. */
  find(name: string): { announce: FileAnnounce; holders: Source[] } | null {
    const rows = this.meshFiles().filter((r) => r.holders.some((h) => !h.self));
    const match = rows
      .filter((r) => answersTo({ ...r, chunkSize: r.chunk_size }, name))
      .sort((x, y) => y.holders.length - x.holders.length)[0];
    if (!match) return null;
    const announce: FileAnnounce = {
      name: match.name,
      aliases: match.aliases,
      file: match.file,
      size: match.size,
      hash: match.hash,
      chunkSize: match.chunk_size,
      root: match.root,
    };
    return { announce, holders: match.holders.filter((h) => !h.self).map((h) => ({ id: h.id, addr: h.addr, name: h.name })) };
  }

  /** Pull `a` into `dest` from its holders (re-read from the mesh whenever the known ones fail), tracked as `name`. */
  async hydrate(
    a: FileAnnounce,
    dest: string,
    o: { signal?: AbortSignal; onProgress?: (p: PullProgress) => void } = {},
  ): Promise<PullResult> {
    // The row that waited for the file under the name it was asked by (an alias, its file name) is this pull now.
    for (const [k, r] of [...this.local]) if (r.state === "waiting" && answersTo(a, k)) this.local.delete(k);
    const row = this.row({ name: a.name, file: a.file, path: dest, state: "hydrating", size: a.size, hash: a.hash, progress: null });
    // Pulled before (asked for by another of its names): the digest cached at the end of that pull vouches for it.
    const had = cachedDigest(this.o.stateDir, dest, a.chunkSize);
    if (had && had.hash === a.hash && had.root === a.root) {
      row.state = "announced";
      return { ok: true, value: { path: dest, resumedChunks: had.chunks.length, fetchedChunks: 0, digest: had } };
    }
    const r = await pullFile({
      announce: a,
      dest,
      sources: () => this.holdersOf(a),
      fetcher: this.o.fetcher,
      stats: this.stats,
      stateDir: this.o.stateDir,
      signal: o.signal,
      log: this.o.log,
      onProgress: (p) => {
        row.progress = progressRow(p);
        o.onProgress?.(p);
      },
    });
    if (r.ok) row.state = "announced";
    else Object.assign(row, { state: "failed", error: r.message });
    return r;
  }

  /** Note that `name` waits for a holder to appear. */
  waiting(name: string, dest: string): void {
    this.row({ name, file: basename(dest), path: dest, state: "waiting", size: null, hash: null, progress: null });
  }

  /** Every file the mesh announces (this node's included), by hash, with its live holders. */
  meshFiles(): MeshFileRow[] {
    const core = this.core;
    if (!core) return [];
    const members = new Map(core.members().map((m) => [m.id, m]));
    // One row per content and chunking: holders in a row serve the very same chunks.
    const byHash = new Map<string, MeshFileRow>();
    for (const r of core.store.live(FILE_PREFIX)) {
      const m = members.get(r.owner);
      if (!m || (m.state !== "alive" && m.state !== "suspect") || r.value === null) continue;
      const a = parseAnnounce(r.key, r.value);
      if (!a) continue;
      let row = byHash.get(`${a.hash}/${a.root}`);
      if (!row) {
        row = {
          name: a.name,
          aliases: a.aliases,
          file: a.file,
          size: a.size,
          hash: a.hash,
          chunk_size: a.chunkSize,
          root: a.root,
          holders: [],
        };
        byHash.set(`${a.hash}/${a.root}`, row);
      }
      row.holders.push({ id: m.id, name: m.name, addr: m.addr, self: m.self });
    }
    return [...byHash.values()].sort((x, y) => x.name.localeCompare(y.name));
  }

  /** Answer GET /mesh/files/... (the route checked the caller). */
  handle(pathname: string): Promise<Response> {
    return this.shelf.handle(pathname);
  }

  /** GET /api/files. */
  report(): FilesReport {
    return { node_id: this.o.selfId, local: [...this.local.values()].map((r) => ({ ...r })), mesh: this.meshFiles() };
  }

  /** Prometheus text. */
  metrics(): string {
    const u = this.shelf.stats;
    const s = this.stats;
    const lines: string[] = [];
    const counter = (name: string, help: string, v: number) =>
      lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} counter`, `${name} ${v}`);
    const gauge = (name: string, help: string, v: number) => lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} gauge`, `${name} ${v}`);
    gauge("mesh_files_announced", "Model files this node offers to peers.", this.shelf.list().length);
    counter("mesh_files_upload_bytes_total", "Model file bytes sent to peers.", u.bytesServed);
    counter("mesh_files_upload_chunks_total", "Model file chunks sent to peers.", u.chunksServed);
    counter("mesh_files_upload_not_found_total", "Requests for a file or chunk this node does not announce.", u.notFound);
    counter("mesh_files_pull_bytes_total", "Model file bytes fetched from peers (bad chunks included).", s.bytesFetched);
    counter("mesh_files_pull_chunks_total", "Model file chunks fetched and verified.", s.chunksFetched);
    counter(
      "mesh_files_pull_chunks_corrupt_total",
      "Fetched chunks that did not match their BLAKE3 hash (fetched again elsewhere).",
      s.chunksCorrupt,
    );
    counter(
      "mesh_files_pull_chunks_resumed_total",
      "Chunks a restarted download found verified on disk and did not fetch again.",
      s.chunksResumed,
    );
    counter(
      "mesh_files_pull_fetch_failures_total",
      "Chunk or manifest fetches that failed (peer unreachable, timed out, cut short).",
      s.fetchFailures,
    );
    counter("mesh_files_pull_whole_mismatches_total", "Finished downloads whose whole-file hash did not match.", s.wholeMismatches);
    counter("mesh_files_pulls_completed_total", "Model file downloads verified and renamed into place.", s.completed);
    counter("mesh_files_pulls_failed_total", "Model file downloads that stopped with an error (kept to resume).", s.failed);
    const active = [...this.local.values()].filter((r) => r.progress !== null);
    if (active.length > 0) {
      lines.push("# HELP mesh_files_pull_bytes_done Bytes of each model file verified on disk.", "# TYPE mesh_files_pull_bytes_done gauge");
      for (const r of active) lines.push(`mesh_files_pull_bytes_done{model="${label(r.name)}"} ${r.progress?.done_bytes ?? 0}`);
      lines.push("# HELP mesh_files_pull_bytes_size Size of each model file being pulled.", "# TYPE mesh_files_pull_bytes_size gauge");
      for (const r of active) lines.push(`mesh_files_pull_bytes_size{model="${label(r.name)}"} ${r.progress?.total_bytes ?? 0}`);
    }
    return `${lines.join("\n")}\n`;
  }

  private holdersOf(a: FileAnnounce): Source[] {
    const row = this.meshFiles().find((r) => r.hash === a.hash && r.root === a.root);
    return (row?.holders ?? []).filter((h) => !h.self).map((h) => ({ id: h.id, addr: h.addr, name: h.name }));
  }

  private publish(a: FileAnnounce): void {
    const r = this.core?.store.put(fileKey(a.hash), serializeAnnounce(a));
    if (r && !r.ok) this.o.log.warn("cannot announce the model file to the mesh", { model: a.name, code: r.code, error: r.message });
  }

  private row(r: LocalFileRow): LocalFileRow {
    this.local.delete(r.name);
    this.local.set(r.name, r);
    while (this.local.size > MAX_LOCAL) {
      const oldest = this.local.keys().next().value as string;
      this.local.delete(oldest);
    }
    return r;
  }
}

/** A progress event as reported. */
export function progressRow(p: PullProgress): ProgressRow {
  return {
    phase: p.phase,
    done_bytes: p.doneBytes,
    total_bytes: p.totalBytes,
    chunks_done: p.chunksDone,
    chunks: p.chunks,
    sources: p.sources,
    bytes_per_sec: Math.round(p.bytesPerSec),
  };
}

function label(v: string): string {
  return v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}
