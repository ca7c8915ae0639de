// The holder's side: the model files this node announces, and the two peer
// routes that serve them to authenticated mesh members: a file's chunk list
// (GET /mesh/files/{hash}/manifest) and one chunk's bytes
// (GET /mesh/files/{hash}/chunks/{i}). Files are found by their hash among
// those announced: no request names a path, so none can reach outside them.
// Every upload shares one rate limit.
import { open } from "node:fs/promises";
import { RateLimiter } from "./limiter";
import { chunkCount, chunkRange, type FileAnnounce, type FileManifest, isHash } from "./manifest";

/** A file this node offers. */
export interface ShelfFile {
  path: string;
  announce: FileAnnounce;
  manifest: FileManifest;
}

/** Counters of uploads, for /metrics. */
export interface UploadStats {
  chunksServed: number;
  bytesServed: number;
  /** Requests for a file or chunk this node does not offer. */
  notFound: number;
  /** Chunks sent damaged on purpose (test fault only). */
  corrupted: number;
}

/** Options of the shelf. */
export interface ShelfOptions {
  /** Bytes per second all uploads together may send (0: no cap). */
  uploadLimit: number;
  /** Test fault: flip a byte in every chunk sent (a lying peer). Never set outside tests. */
  corruptUploads?: boolean;
}

// Bytes read and sent at a time under a cap, so the limit paces smoothly and memory stays small.
const BLOCK = 256 * 1024;
const PATH = /^\/mesh\/files\/([^/]+)\/(manifest|chunks\/(\d{1,9}))$/;

/** The files a node uploads. */
export class Shelf {
  private readonly files = new Map<string, ShelfFile>();
  readonly limiter: RateLimiter;
  readonly stats: UploadStats = { chunksServed: 0, bytesServed: 0, notFound: 0, corrupted: 0 };

  constructor(private readonly o: ShelfOptions) {
    this.limiter = new RateLimiter(o.uploadLimit);
  }

  /** Offer `f` to peers. */
  add(f: ShelfFile): void {
    this.files.set(f.announce.hash, f);
  }

  /** Whether a file of this hash is offered. */
  has(hash: string): boolean {
    return this.files.has(hash);
  }

  /** The files offered. */
  list(): ShelfFile[] {
    return [...this.files.values()];
  }

  /** Answer a GET under /mesh/files/ from an authenticated member (the caller checked that). */
  async handle(pathname: string): Promise<Response> {
    const m = PATH.exec(pathname);
    const f = m && isHash(m[1]) ? this.files.get(m[1]) : undefined;
    if (!m || !f) return this.notFound("no such file is announced by this node");
    if (m[2] === "manifest") return Response.json(f.manifest, { headers: { "cache-control": "no-store" } });
    const i = Number(m[3]);
    const n = chunkCount(f.announce.size, f.announce.chunkSize);
    if (!Number.isSafeInteger(i) || i >= n) return this.notFound(`chunk ${m[3]} is past the file's ${n} chunks`);
    const { start, end } = chunkRange(f.announce.size, f.announce.chunkSize, i);
    if (this.limiter.bytesPerSec <= 0 && !this.o.corruptUploads) {
      // No cap: the file's bytes go out as they are (Bun can hand them to the socket without copying them through JS).
      this.stats.chunksServed++;
      this.stats.bytesServed += end - start;
      return new Response(Bun.file(f.path).slice(start, end), {
        headers: { "content-type": "application/octet-stream", "x-mesh-chunk": String(i) },
      });
    }
    return new Response(this.stream(f.path, start, end), {
      headers: { "content-type": "application/octet-stream", "content-length": String(end - start), "x-mesh-chunk": String(i) },
    });
  }

  private notFound(message: string): Response {
    this.stats.notFound++;
    return Response.json({ error: { message, type: "invalid_request_error", param: null, code: "not_found" } }, { status: 404 });
  }

  private stream(path: string, start: number, end: number): ReadableStream<Uint8Array> {
    let fh: Awaited<ReturnType<typeof open>> | null = null;
    let at = start;
    let first = true;
    const close = async () => {
      const h = fh;
      fh = null;
      await h?.close().catch(() => {});
    };
    return new ReadableStream<Uint8Array>({
      pull: async (c) => {
        try {
          fh ??= await open(path, "r");
          if (at >= end) {
            await close();
            this.stats.chunksServed++;
            c.close();
            return;
          }
          const n = Math.min(BLOCK, end - at);
          await this.limiter.take(n);
          const buf = Buffer.allocUnsafe(n);
          const { bytesRead } = await fh.read(buf, 0, n, at);
          if (bytesRead !== n) throw new Error("the file shrank while it was served");
          if (first && this.o.corruptUploads) {
            buf[0] = (buf[0] ?? 0) ^ 0xff;
            this.stats.corrupted++;
          }
          first = false;
          at += n;
          this.stats.bytesServed += n;
          c.enqueue(buf);
        } catch (e) {
          await close();
          c.error(e);
        }
      },
      cancel: close,
    });
  }
}
