import { silentLogger } from "../../src/log";
import { DEFAULT_AUTHORITY, MeshAuthority, meshKeys } from "../../src/mesh/auth";
import { MeshClient } from "../../src/mesh/client";
import type { WireMessage, WorkerInfo } from "../../src/mesh/wire";
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
  return {
    client,
    gate: new MeshGate(authority, 8 * 1024 * 1024, silentLogger),
    apiKeyRequired: o.apiKeyRequired ?? false,
    forwarder: new Forwarder({
      client,
      keys,
      selfId: o.nodeId,
      workers,
      headersTimeoutMs: o.headersTimeoutMs ?? 60_000,
      logger: silentLogger,
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
    kvTotal: 4096,
    queueDepth: 0,
    health: "ready",
    ...o,
  };
}
