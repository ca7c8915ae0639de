// What the HTTP app needs from the mesh, and the few helpers that let the
// OpenAI routes answer for models served elsewhere.
import type { WorkerDevice, WorkerInfo } from "../mesh/wire";
import type { Decision, RouteKey, RouteKeyer, Router } from "../routing";
import type { PeerSyncState } from "../routing/sync";
import { ApiError, badRequest } from "./errors";
import { ForwardError, type Forwarder, type ForwardShape } from "./forward";
import type { MeshGate } from "./mesh-gate";
import type { MeshFigures } from "./mesh-metrics";
import type { MeshService } from "./mesh-routes";
import type { RunReport } from "./openai/run";

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
  /** Where requests run (routing/), and the keys it routes by (under this mesh's secret). */
  router: Router;
  keyer: RouteKeyer;
  /** Whether an inference API key is configured. */
  apiKeyRequired: boolean;
  /** Figures for /metrics; null before the node has joined. */
  figures(): MeshFigures | null;
  /** GET `path` of the member at `addr` with mesh credentials; its JSON, or null (the console reads peers' /api/node). */
  peerGet?(addr: string, path: string, timeoutMs: number): Promise<unknown>;
  /** The routing index sync's state per peer (the console's freshness view). */
  syncPeers?(): PeerSyncState[];
  /** Model files this node uploads and downloads (set once the node knows them; absent: none). */
  files?: FileHooks;
}

/** Model files as the routes see them (implemented by hydration/files). */
export interface FileHooks {
  /** Answer a GET under /mesh/files/ for a caller already authenticated as a mesh member. */
  handle(pathname: string): Promise<Response>;
  /** GET /api/files: this node's model files and those the mesh announces. */
  report(): unknown;
  /** Prometheus text of the uploads and downloads. */
  metrics(): string;
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
  return JSON.parse(dec.decode(raw)) as unknown;
}

/**
 * What a peer is sent instead of the client's own body: another route's request (built only when a
 * peer is chosen). A route whose body does not stand alone (a Responses request naming a stored
 * response this node holds) forwards the self-contained request it translates to.
 */
export interface ForwardAs {
  path: string;
  body: () => Uint8Array;
}

/** Response headers that tell where a request ran and why. */
export const ROUTE_HEADER = { servedBy: "x-mesh-served-by", node: "x-mesh-node", route: "x-mesh-route" } as const;

/**
 * Where each generating request ran and why, as response headers, errors included: `x-mesh-node` and
 * `x-mesh-served-by` (the node that ran it: this one, or as the peer said) and `x-mesh-route` (this
 * node's decision, routeLabel: cache, load; local when it came from a peer or no choice was made).
 */
export const routeLabels = new WeakMap<Request, Record<string, string>>();

function label(request: Request, route: string, servedBy: string | null): void {
  const by: Record<string, string> = servedBy ? { [ROUTE_HEADER.servedBy]: servedBy, [ROUTE_HEADER.node]: servedBy } : {};
  routeLabels.set(request, { [ROUTE_HEADER.route]: route, ...by });
}

/**
 * The x-mesh-route of a decision: cache or load (what won); a decision without a contest (one node
 * serves the model) is local when that node is this one, else load.
 */
export function routeLabel(d: Decision | null): string {
  if (!d) return "local";
  if (d.reason === "only") return d.target.local ? "local" : "load";
  return d.reason;
}
/** How a generating request is answered: by a peer (its response, relayed), or here, with its key for the engine's marks. */
export type Route =
  | { kind: "peer"; response: Response; decision: Decision; key: RouteKey }
  | { kind: "here"; key: RouteKey | null; decision: Decision | null; routing: LocalRouting | null };

/** What a local run needs for routing: the key its marks come from, and where to report. */
export interface LocalRouting {
  key: RouteKey;
  keyer: RouteKeyer;
  router: Router;
  /** This node's worker for the model, counted as busy while the request runs. */
  workerId: string | null;
  /** Told what the run showed when it finishes (the console's request record). */
  onReport?: (r: RunReport) => void;
}

/**
 * Route a generating request: compute its key, let routing decide, and forward it when a peer wins.
 * A request that came from a peer is never forwarded again, so two nodes with stale views of each
 * other cannot bounce a request between them. When the peers ranked before this node fail or refuse
 * and the model is served here, it runs here. `key` computes the request's routing key (only with a
 * mesh); the body has passed every check that does not need the model, so a request that will be
 * refused never moves a lease or a counter.
 */
export async function routeRequest(
  mesh: MeshHooks | undefined,
  model: string,
  servedHere: boolean,
  path: string,
  request: Request,
  key: (keyer: RouteKeyer) => RouteKey,
  /** The name the request used: the model's id (`model`, which the key must be computed under), or an alias of it. */
  name = model,
  /** How forwarded answers and the forwarder's own errors are worded (the route's API). */
  shape?: ForwardShape,
  /** Forward this request instead of the client's body. */
  as?: ForwardAs,
  /** Serve it here whatever the policy says (a session whose checkpoints this node holds). */
  stay = false,
): Promise<Route> {
  if (!mesh) return { kind: "here", key: null, decision: null, routing: null };
  let k: RouteKey;
  try {
    k = key(mesh.keyer);
  } catch (e) {
    // Checked bodies key without error; this only keeps an unforeseen shape from becoming a 500.
    throw badRequest(`the request could not be keyed for routing: ${(e as Error)?.message ?? e}`);
  }
  const local = (): LocalRouting => ({
    key: k,
    keyer: mesh.keyer,
    router: mesh.router,
    workerId: mesh.router.localWorker(model)?.id ?? null,
  });
  const body = rawBodies.get(request);
  const self = mesh.service.nodeId();
  if (mesh.gate.caller(request) || (!body && !as) || (stay && servedHere)) {
    mesh.router.countLocal();
    label(request, "local", self);
    return { kind: "here", key: k, decision: null, routing: local() };
  }
  const decision = mesh.router.decide(model, k, name);
  label(request, routeLabel(decision), decision === null || decision.target.local ? self : null);
  if (!decision) {
    // Served somewhere, but nowhere ready yet: say so rather than "does not exist".
    // (Served here, the local path answers: it runs, or says the model is still loading.)
    if (!servedHere) loadingElsewhere(mesh, name);
    return { kind: "here", key: k, decision, routing: local() };
  }
  if (decision.target.local) return { kind: "here", key: k, decision, routing: local() };
  const order = decision.ranked.map((c) => c.candidate.worker);
  const sent = as ? as.body() : (body as Uint8Array);
  const answer = await mesh.forwarder.forward(order, name, as?.path ?? path, sent, request.signal, shape);
  const ranOn = answer === null ? self : answer.worker?.nodeId;
  // The conversation's lease follows where it really ran, not where routing first sent it.
  if (ranOn && ranOn !== decision.target.worker.nodeId) mesh.router.lease(k, ranOn);
  if (answer === null) {
    label(request, routeLabel(decision), self);
    return { kind: "here", key: k, decision, routing: local() };
  }
  return { kind: "peer", response: answer.response, decision, key: k };
}

/** Served somewhere, but nowhere ready yet: say so (503) rather than "does not exist". */
function loadingElsewhere(mesh: MeshHooks, name: string): void {
  if (mesh.service.workers().some((w) => w.models.includes(name))) {
    throw new ApiError(503, "server_error", `model '${name}' is loading on every node that serves it`, null, "model_unavailable", 5);
  }
}

/**
 * The model id `name` stands for in the mesh: itself when a worker serves a model of that id, else the
 * model of the workers that carry it as an alias (the first in order of model id, should two nodes give
 * the same alias to different models); null when no worker answers to it. A worker record lists its
 * model first, then the model's aliases.
 */
export function meshModelOf(mesh: MeshHooks | undefined, name: string): string | null {
  if (!mesh) return null;
  let alias: string | null = null;
  for (const w of mesh.service.workers()) {
    if (w.models[0] === name) return name;
    const id = w.models[0] as string;
    if (w.models.includes(name) && (alias === null || id < alias)) alias = id;
  }
  return alias;
}

/**
 * Send a request that needs a model but not its cache (the tokenizer endpoints, counting tokens) to a ready peer serving `model`
 * under `name`, least loaded first, and relay its answer. A request that came from a peer is never
 * forwarded again. Throws ForwardError (no_route: 404) when no peer serves it, ApiError 503 while
 * every one is still loading.
 */
export async function forwardToPeer(
  mesh: MeshHooks | undefined,
  model: string,
  name: string,
  path: string,
  request: Request,
  shape?: ForwardShape,
): Promise<Response> {
  const body = rawBodies.get(request);
  const missing = new ForwardError("no_route", `The model '${name}' does not exist`, name);
  if (!mesh || !body || mesh.gate.caller(request)) throw missing;
  const self = mesh.service.nodeId();
  const load = (w: WorkerInfo) => w.slotsBusy + w.queueDepth + mesh.router.inflightOf(w.id);
  const order = mesh.router
    .workersFor(model, name)
    .filter((w) => w.nodeId !== self)
    .sort((a, b) => load(a) - load(b));
  if (order.length === 0) {
    loadingElsewhere(mesh, name);
    throw missing;
  }
  const answer = await mesh.forwarder.forward(order, name, path, body, request.signal, shape);
  if (!answer) throw missing; // only a list holding this node's own worker answers null
  return answer.response;
}

/** One node serving a model, as listed by /v1/models. */
export interface ModelNode {
  node_id: string;
  addr: string;
  status: string;
  local: boolean;
  /** The compute devices the node's worker loaded on; absent while loading and from older nodes. */
  devices?: WorkerDevice[];
}

/** The nodes serving each model in the mesh (this node's own included), by model id. */
export function meshModelNodes(mesh: MeshHooks | undefined): Map<string, ModelNode[]> {
  const out = new Map<string, ModelNode[]>();
  if (!mesh) return out;
  const self = mesh.service.nodeId();
  for (const w of mesh.service.workers()) {
    for (const m of w.models) {
      const list = out.get(m) ?? [];
      list.push({
        node_id: w.nodeId,
        addr: w.addr,
        status: w.health,
        local: w.nodeId === self,
        ...(w.devices ? { devices: w.devices } : {}),
      });
      out.set(m, list);
    }
  }
  return out;
}
