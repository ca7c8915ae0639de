// What the HTTP app needs from the mesh, and the few helpers that let the
// OpenAI routes answer for models served elsewhere.
import type { WorkerInfo } from "../mesh/wire";
import type { Forwarder } from "./forward";
import type { MeshGate } from "./mesh-gate";
import type { MeshFigures } from "./mesh-metrics";
import type { MeshService } from "./mesh-routes";

/** The mesh as the app sees it; absent when the node runs alone. */
export interface MeshHooks {
  gate: MeshGate;
  service: MeshService & {
    /** This node's id. */
    nodeId(): string;
    /** Every worker the mesh knows (this node's included), for /v1/models. */
    workers(): readonly WorkerInfo[];
  };
  forwarder: Forwarder;
  /** Whether an inference API key is configured. */
  apiKeyRequired: boolean;
  /** Figures for /metrics; null before the node has joined. */
  figures(): MeshFigures | null;
}

const rawBodies = new WeakMap<Request, Uint8Array>();
const dec = new TextDecoder();

/**
 * Elysia body parser that keeps the raw bytes: a forwarded request must reach
 * the peer exactly as the client sent it (validation strips unknown fields).
 */
export async function rawJson({ request }: { request: Request }): Promise<unknown> {
  const raw = new Uint8Array(await request.arrayBuffer());
  rawBodies.set(request, raw);
  return JSON.parse(dec.decode(raw));
}

/**
 * The peer's answer when `model` is served elsewhere, else null (serve it here,
 * or 404). A request that came from a peer is never forwarded again, so two
 * nodes with stale views of each other cannot bounce a request between them.
 */
export async function remoteAnswer(
  mesh: MeshHooks | undefined,
  servedHere: boolean,
  model: string,
  path: string,
  request: Request,
): Promise<Response | null> {
  if (servedHere || !mesh || mesh.gate.caller(request)) return null;
  const body = rawBodies.get(request);
  if (!body) return null;
  return mesh.forwarder.forward(model, path, body, request.signal);
}

/** One node serving a model, as listed by /v1/models. */
export interface ModelNode {
  node_id: string;
  addr: string;
  status: string;
  local: boolean;
}

/** The nodes serving each model in the mesh (this node's own included), by model id. */
export function meshModelNodes(mesh: MeshHooks | undefined): Map<string, ModelNode[]> {
  const out = new Map<string, ModelNode[]>();
  if (!mesh) return out;
  const self = mesh.service.nodeId();
  for (const w of mesh.service.workers()) {
    for (const m of w.models) {
      const list = out.get(m) ?? [];
      list.push({ node_id: w.nodeId, addr: w.addr, status: w.health, local: w.nodeId === self });
      out.set(m, list);
    }
  }
  return out;
}
