// How `mesh peers` and `mesh invite` talk to the node running on this machine:
// the mesh credentials from the state dir sign the request (or an API key does),
// and with them an answer counts only with the node's reply proof: whatever
// else listens on the node's port (its process gone) is not believed.
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { defaultStateDir } from "../dirs";
import { AUTH_HEADER, type Exchange, meshKeys, proofsEqual, replyProof } from "../mesh/auth";
import { readLimited } from "../mesh/body";
import { MeshClient, MeshClientError } from "../mesh/client";
import { loadCredentials, type MeshCredentials } from "../mesh/invite";
import { UsageError } from "./usage";

/** Where a running node says it can be reached; written by `mesh serve` into its state dir. */
export interface NodeRecord {
  url: string;
  addr: string;
  pid: number;
  /** The node's id: requests to it name it, so nothing on its port can pass them on to another node. */
  id?: string;
}

const NODE_FILE = "node.json";
const DEFAULT_URL = "http://127.0.0.1:9337";
const MAX_ANSWER_BYTES = 16 * 1024 * 1024;

/** Record where this node listens, so local commands find it without --url. */
export function writeNodeRecord(stateDir: string, r: NodeRecord): void {
  const file = join(stateDir, NODE_FILE);
  const tmp = `${file}.${process.pid}.tmp`;
  writeFileSync(tmp, `${JSON.stringify(r)}\n`, { mode: 0o600 });
  renameSync(tmp, file);
}

/** The node record in `stateDir`, if any. */
export function readNodeRecord(stateDir: string): NodeRecord | null {
  const file = join(stateDir, NODE_FILE);
  if (!existsSync(file)) return null;
  try {
    const r = JSON.parse(readFileSync(file, "utf8")) as Partial<NodeRecord>;
    if (typeof r.url !== "string" || typeof r.addr !== "string") return null;
    return { url: r.url, addr: r.addr, pid: Number(r.pid), ...(typeof r.id === "string" ? { id: r.id } : {}) };
  } catch {
    return null;
  }
}

/** Options shared by commands that ask a running node. */
export interface NodeClientFlags {
  url?: string;
  stateDir?: string;
  apiKey?: string;
}

/** A signed connection to a running node. */
export interface NodeClient {
  url: string;
  stateDir: string;
  creds: MeshCredentials | null;
  record: NodeRecord | null;
  /** GET `path` and parse its JSON; throws an Error with one clear line on any failure. */
  get(path: string): Promise<unknown>;
}

function hostPort(url: string): string {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new UsageError(`--url must be a URL like ${DEFAULT_URL}, got '${url}'`);
  }
  if (u.protocol !== "http:") throw new UsageError(`--url must be an http:// URL, got '${url}'`);
  return `${u.hostname.includes(":") && !u.hostname.startsWith("[") ? `[${u.hostname}]` : u.hostname}:${u.port || "80"}`;
}

/** Open a client for the node of `stateDir` (or --url); throws UsageError for bad flags. */
export function nodeClient(f: NodeClientFlags): NodeClient {
  const stateDir = f.stateDir ?? defaultStateDir();
  const record = readNodeRecord(stateDir);
  const url = (f.url ?? record?.url ?? DEFAULT_URL).replace(/\/+$/, "");
  const addr = hostPort(url);
  const stored = loadCredentials(stateDir);
  if (!stored.ok) throw new Error(stored.message);
  const creds = stored.value;
  if (!creds && !f.apiKey) {
    throw new Error(`no mesh credentials in ${stateDir}: pass the node's --state-dir (or set MESH_STATE_DIR), or --api-key`);
  }
  // A tool, not a member: a node id of its own so its requests are never mistaken for a peer's.
  const keys = creds ? meshKeys(creds.secret) : null;
  const client = keys ? new MeshClient({ keys, nodeId: `cli-${randomBytes(4).toString("hex")}` }) : null;
  // Asking the node this state dir records, we know its id: the request names it, so whatever took its
  // port cannot pass it on to another node of the mesh and have that node's proven answer believed.
  const to = record?.id !== undefined && url === record.url.replace(/\/+$/, "") ? record.id : undefined;
  const get = async (path: string): Promise<unknown> => {
    const signal = AbortSignal.timeout(30_000);
    let res: Response;
    // The nonces the request was signed with: the reply proof is bound to them (none with an API key, which proves nothing back).
    let exchange: Exchange | null = null;
    try {
      if (client) {
        const sent = await client.send(addr, "GET", path, new Uint8Array(), { signal, to });
        res = sent.response;
        exchange = { nonce: sent.nonce, callerNonce: sent.callerNonce };
      } else res = await fetch(`${url}${path}`, { headers: { authorization: `Bearer ${f.apiKey}` }, signal });
    } catch (e) {
      const code = e instanceof MeshClientError ? e.code : "unreachable";
      if (code === "timeout") throw new Error(`the node at ${url} did not answer within 30 s`);
      throw new Error(`no mesh node is running at ${url} (start one with 'mesh serve', or pass --url)`);
    }
    const body = await readLimited(res.body, MAX_ANSWER_BYTES);
    if (res.status === 401) {
      // A refusal cannot be proven (the node did not accept who we are), so it may come from anything on that port.
      throw new Error(
        client
          ? `${url} refused the mesh credentials in ${stateDir}: it is a node of another mesh, or not a mesh node at all`
          : `the node at ${url} refused the API key`,
      );
    }
    if (body === null) throw new Error(`the node at ${url} sent an answer over ${MAX_ANSWER_BYTES} bytes to ${path}`);
    if (keys && exchange !== null) {
      const proof = res.headers.get(AUTH_HEADER.replyProof) ?? "";
      if (!proofsEqual(proof, replyProof(keys, { ...exchange, status: res.status, body }))) {
        throw new Error(
          `the answer at ${url} has no valid mesh proof (HTTP ${res.status}): whatever listens there is not a node of the mesh in ${stateDir}`,
        );
      }
    }
    if (res.status !== 200) throw new Error(`the node at ${url} answered HTTP ${res.status} to ${path}`);
    try {
      return JSON.parse(new TextDecoder().decode(body));
    } catch {
      throw new Error(`the node at ${url} sent an answer that is not JSON`);
    }
  };
  return { url, stateDir, creds, record, get };
}
