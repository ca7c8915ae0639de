import { silentLogger } from "../../src/log";
import { AUTH_HEADER, DEFAULT_AUTHORITY, type Exchange, MeshAuthority, meshKeys } from "../../src/mesh/auth";
import { MeshClient } from "../../src/mesh/client";
import type { WireMessage, WorkerInfo } from "../../src/mesh/wire";
import { RouteKeyer, Router } from "../../src/routing";
import { type RunningServer, startServer } from "../../src/server";
import { Forwarder } from "../../src/server/forward";
import type { MeshHooks } from "../../src/server/mesh";
import { MeshGate } from "../../src/server/mesh-gate";

/** The secret of in-process test meshes. */
export const TEST_SECRET = "the mesh secret of in-process tests, 43 chars";
export const TEST_MESH_ID = "00112233aabbccdd";

/** Mesh hooks for an in-process node: real gate, client and forwarder over a worker list the test controls. */
export function testMeshHooks(o: {
  nodeId: string;
  workers?: () => WorkerInfo[];
  /** Answers a peer message; `from` is the node id its mesh authentication vouched for. */
  handle?: (m: WireMessage, from: string) => Promise<WireMessage>;
  apiKeyRequired?: boolean;
  ttlMs?: number;
  secret?: string;
  headersTimeoutMs?: number;
}): MeshHooks & { client: MeshClient } {
  const keys = meshKeys(o.secret ?? TEST_SECRET);
  const authority = new MeshAuthority(keys, { ...DEFAULT_AUTHORITY, ttlMs: o.ttlMs ?? DEFAULT_AUTHORITY.ttlMs, now: Date.now });
  const client = new MeshClient({ keys, nodeId: o.nodeId });
  const workers = o.workers ?? (() => []);
  const router = new Router({ selfId: o.nodeId, workers });
  return {
    client,
    gate: new MeshGate(authority, 8 * 1024 * 1024, silentLogger),
    apiKeyRequired: o.apiKeyRequired ?? false,
    router,
    keyer: new RouteKeyer(o.secret ?? TEST_SECRET),
    forwarder: new Forwarder({
      client,
      keys,
      selfId: o.nodeId,
      headersTimeoutMs: o.headersTimeoutMs ?? 60_000,
      logger: silentLogger,
      inflight: router,
    }),
    figures: () => null,
    service: {
      nodeId: () => o.nodeId,
      workers,
      handler: () => o.handle ?? (async (m) => ({ type: "ack", echo: m })),
      info: () => ({ mesh_id: TEST_MESH_ID, node_id: o.nodeId, name: o.nodeId, addrs: [] }),
      peers: () => ({
        mesh_id: TEST_MESH_ID,
        node_id: o.nodeId,
        members: [],
        forwarding: { forwarded: 0, retried: 0, failed: 0, active: 0 },
      }),
    },
  };
}

/** A worker record with sensible defaults. */
export function workerRecord(o: Partial<WorkerInfo> & { id: string; nodeId: string; addr: string }): WorkerInfo {
  return {
    models: ["mesh-tiny"],
    ctxSize: 4096,
    slotsTotal: 2,
    slotsBusy: 0,
    kvUsed: 0,
    kvCached: 0,
    kvTotal: 4096,
    queueDepth: 0,
    health: "ready",
    ...o,
  };
}

/** A node with no model, only its mesh routes (hooks from testMeshHooks; `adjust` may change them). */
export function meshOnlyServer(nodeId: string, secret: string, adjust: (h: MeshHooks) => MeshHooks = (h) => h): RunningServer {
  const mesh = adjust(testMeshHooks({ nodeId, secret }));
  return startServer({ host: "127.0.0.1", port: 0, models: [], apiKeys: [], maxBodyBytes: 1 << 20, logger: silentLogger, mesh });
}

/** A nonce anyone may hand out as a challenge. */
export const ANY_NONCE = "AAAAAAAAAAAAAAAAAAAAAA";

/**
 * Something on a node's port without the mesh secret: it hands out `nonce` as its challenge, as a
 * node would, and answers every other request with `answer`; it cannot prove anything.
 */
export function challengingServer(answer: (req: Request) => Response | Promise<Response>, nonce = ANY_NONCE): ReturnType<typeof Bun.serve> {
  return Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    fetch: (req) => (new URL(req.url).pathname === "/mesh/challenge" ? Response.json({ nonce, ttl_ms: 30000 }) : answer(req)),
  });
}

/** The nonces a mesh request was signed with, as its proofs must cover them. */
export function exchangeOf(r: Request): Exchange {
  return { nonce: r.headers.get(AUTH_HEADER.nonce) ?? "", callerNonce: r.headers.get(AUTH_HEADER.callerNonce) ?? "" };
}

/** A port nothing listens on (it was free a moment ago). */
export async function closedPort(): Promise<number> {
  const s = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response() });
  const port = s.port as number;
  s.stop(true);
  return port;
}
