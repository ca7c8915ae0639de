// Fetching manifests and chunks from holders over authenticated mesh HTTP:
// every request is signed with the mesh secret and names the holder's node id.
// What comes back is checked by hash, not trusted.
import { readLimited } from "../../mesh/body";
import type { MeshClient } from "../../mesh/client";
import type { ChunkFetcher, Source } from "./download";
import { MAX_CHUNKS } from "./manifest";

// A manifest lists at most MAX_CHUNKS 64-hex hashes.
const MAX_MANIFEST_BYTES = MAX_CHUNKS * 70 + 4096;

/** A ChunkFetcher over `client` (a member's, or a tool's with the mesh credentials). */
export function meshFetcher(client: MeshClient): ChunkFetcher {
  const get = async (src: Source, path: string, limit: number, signal: AbortSignal): Promise<Uint8Array> => {
    const { response } = await client.send(src.addr, "GET", path, new Uint8Array(), { signal, to: src.id });
    if (response.status !== 200) {
      await response.body?.cancel().catch(() => {});
      throw new Error(`${src.name} answered HTTP ${response.status} to ${path}`);
    }
    const bytes = await readLimited(response.body, limit);
    if (bytes === null) throw new Error(`${src.name} sent more than ${limit} bytes for ${path}`);
    return bytes;
  };
  return {
    manifest: async (src, hash, signal) =>
      JSON.parse(new TextDecoder().decode(await get(src, `/mesh/files/${hash}/manifest`, MAX_MANIFEST_BYTES, signal))) as unknown,
    chunk: async (src, hash, i, length, signal) => {
      const bytes = await get(src, `/mesh/files/${hash}/chunks/${i}`, length, signal);
      if (bytes.byteLength !== length) throw new Error(`${src.name} sent ${bytes.byteLength} of chunk ${i}'s ${length} bytes`);
      return bytes;
    },
  };
}
