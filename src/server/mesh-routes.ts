// /mesh (the peer protocol) and /api/peers (the admin view of the mesh). The
// app's onRequest has already run MeshGate.check on any request carrying mesh
// credentials; these routes only look up who passed. The plugin also signs
// every answer to a mesh-authenticated request elsewhere (a forwarded
// /v1 request), so the forwarding node can tell its peer from an impostor.

import { Elysia } from "elysia";
import type { Logger } from "../log";
import { isWireMessage, MAX_MESSAGE_BYTES } from "../mesh/transport-http";
import type { WireMessage, WorkerDevice } from "../mesh/wire";
import type { RoutingCounts, RoutingMode } from "../routing";
import type { RouteSyncStats } from "../routing/sync";
import type { SplitReport, StageOfferRow } from "../split/report";
import { ApiError, errorBody } from "./errors";
import type { ForwardStats } from "./forward";
import type { FileHooks } from "./mesh";
import { type MeshGate, meshUnauthorized } from "./mesh-gate";

/** One member as `mesh peers` shows it. */
export interface PeerRow {
  id: string;
  name: string;
  addr: string;
  state: string;
  incarnation: number;
  /** Milliseconds since this node last heard from the member; null for itself or never. */
  last_seen_ms: number | null;
  rtt_ms: number | null;
  self: boolean;
  models: string[];
  /** Other names each model answers to (`mesh serve --alias`), by model; absent from nodes that predate aliases. */
  aliases?: Record<string, string[]>;
  slots_busy: number;
  slots_total: number;
  /** KV cells committed to running requests. */
  kv_used: number;
  /** KV cells holding a prefix, running or idle cache. */
  kv_cached: number;
  kv_total: number;
  queue_depth: number;
  /** Ids of the member's workers (stable across its restarts). */
  workers: string[];
  /** Compute devices its workers loaded on (memory as of the load); empty while loading, absent from older nodes. */
  devices?: WorkerDevice[];
}

/** What cache-aware routing did on this node and what it knows. */
export interface RoutingReport {
  mode: RoutingMode;
  /** Decisions by what won (cache, load, only; local: no choice made), and where they ran. */
  decisions: RoutingCounts;
  /** The prefix index per model: entries (path hashes) and their estimated bytes. */
  index: Array<{ model: string; entries: number; bytes: number; budget_evictions: number }>;
  /** The index sync; null before the node started. */
  sync: RouteSyncStats | null;
}

/** The answer of GET /api/peers. */
export interface PeersReport {
  mesh_id: string;
  node_id: string;
  members: PeerRow[];
  /** Requests this node forwarded to peers. */
  forwarding: ForwardStats;
  /** Absent in reports of nodes that predate cache-aware routing. */
  routing?: RoutingReport;
  /** Stage offers the mesh knows (--offer-stage), and the split models this node heads; absent before split models. */
  stages?: StageOfferRow[];
  splits?: SplitReport[];
}

/** Where a node can be reached and which mesh it belongs to. */
export interface MeshInfo {
  mesh_id: string;
  node_id: string;
  name: string;
  /** This node's advertised address first, then other live members'. */
  addrs: string[];
}

/** What the routes need from the running mesh node. */
export interface MeshService {
  /** This node's id: mesh requests addressed to any other node are refused. */
  nodeId(): string;
  /** Handle one inbound peer message from the authenticated node `from`; null while the node is still starting. */
  handler(): ((msg: WireMessage, from: string) => Promise<WireMessage>) | null;
  info(): MeshInfo;
  peers(): PeersReport;
}

/** Options of the mesh routes. */
export interface MeshRoutesOptions {
  gate: MeshGate;
  service: MeshService;
  /** Whether an inference API key is configured (then a request that reached a route already presented one). */
  apiKeyRequired: boolean;
  logger: Logger;
  /** Model files (uploads to members, GET /api/files); read per request, as they are set after the server starts. */
  files?: () => FileHooks | undefined;
}

const enc = new TextEncoder();

/** The /mesh and /api/peers routes as an Elysia plugin. */
export function meshRoutes(o: MeshRoutesOptions) {
  const json = (request: Request, status: number, value: unknown): Response => {
    const body = enc.encode(JSON.stringify(value));
    return new Response(body, { status, headers: { "content-type": "application/json", ...o.gate.replyHeaders(request, status, body) } });
  };
  const error = (request: Request, e: ApiError) => json(request, e.status, errorBody(e));
  // The gate refuses requests addressed to another node: it must know which node it guards before the first one arrives.
  o.gate.guard(() => o.service.nodeId());
  const refused = () => {
    const e = meshUnauthorized();
    return new Response(JSON.stringify(errorBody(e)), { status: e.status, headers: { "content-type": "application/json" } });
  };

  return new Elysia({ name: "mesh-routes" })
    .wrap(
      // A wrapper of the whole app rather than a hook: a plugin's hooks never reach the /v1 routes mounted before it, and a
      // forwarded answer needs its proof whether a route, the error handler or an early refusal produced it.
      (handle, request) =>
        async (...args: unknown[]) => {
          const response: unknown = await handle(...args);
          return response instanceof Response ? o.gate.signAnswer(request, response) : response;
        },
    )
    .onAfterHandle(({ response, set }) => {
      // These routes answer with Response objects: request logs and metrics should see their real status.
      if (response instanceof Response) set.status = response.status;
    })
    .get("/mesh/challenge", () => {
      const c = o.gate.authority.challenge();
      return new Response(JSON.stringify({ nonce: c.nonce, ttl_ms: c.ttlMs }), {
        headers: { "content-type": "application/json", "cache-control": "no-store" },
      });
    })
    .get("/mesh/info", ({ request }) => (o.gate.caller(request) ? json(request, 200, o.service.info()) : refused()))
    .post(
      "/mesh/rpc",
      async ({ request }) => {
        const caller = o.gate.caller(request);
        if (!caller) return refused();
        if (caller.body.byteLength > MAX_MESSAGE_BYTES) {
          const message = `mesh messages are limited to ${MAX_MESSAGE_BYTES} bytes`;
          return json(request, 413, { error: { message, type: "invalid_request_error", param: null, code: "request_too_large" } });
        }
        let msg: unknown;
        try {
          msg = JSON.parse(new TextDecoder().decode(caller.body));
        } catch {
          msg = null;
        }
        if (!isWireMessage(msg)) {
          return json(request, 400, {
            error: { message: "not a mesh message", type: "invalid_request_error", param: null, code: "bad_message" },
          });
        }
        const handle = o.service.handler();
        if (!handle) {
          return json(request, 503, { error: { message: "node is starting", type: "server_error", param: null, code: "starting" } });
        }
        try {
          return json(request, 200, await handle(msg, caller.nodeId));
        } catch (e) {
          o.logger.warn("mesh message failed", { type: msg.type, from: caller.nodeId, error: (e as Error)?.message });
          return json(request, 500, {
            error: { message: "the message could not be handled", type: "server_error", param: null, code: "handler_failed" },
          });
        }
      },
      { parse: "none" },
    )
    .get("/api/peers", ({ request }) => {
      // With mesh credentials the gate verified them; without, only a configured (and already checked) API key lets one in.
      if (!o.gate.caller(request) && !o.apiKeyRequired) return refused();
      return json(request, 200, o.service.peers());
    })
    .get("/mesh/files/*", ({ request }) => {
      // File bytes only to members: the gate verified the caller's proof, or there is none and nothing is read.
      if (!o.gate.caller(request)) return refused();
      const files = o.files?.();
      if (!files) return error(request, new ApiError(404, "invalid_request_error", "this node announces no files", null, "not_found"));
      return files.handle(new URL(request.url).pathname);
    })
    .get("/api/files", ({ request }) => {
      if (!o.gate.caller(request) && !o.apiKeyRequired) return refused();
      return json(request, 200, o.files?.()?.report() ?? { node_id: o.service.nodeId(), local: [], mesh: [] });
    })
    .all("/mesh/*", ({ request }) =>
      o.gate.caller(request)
        ? error(request, new ApiError(404, "invalid_request_error", "unknown mesh route", null, "not_found"))
        : refused(),
    );
}
