// The mesh console: GET / serves the page; /api/requests, /api/events,
// /api/mesh, /api/node and /api/cache are the admin API it reads (and scripts
// may). It records every generating request this node takes part in, with
// routing's own decision record, and streams changes to subscribers.
//
// Guard: with API keys every data endpoint needs one (the app's key check
// runs first) and the page asks for it; without keys the console is served
// only when the node listens on loopback, unless the mode is "public"; "off"
// turns it off. Peers read /api/node with mesh credentials whatever the mode.
import { randomBytes } from "node:crypto";
import { Elysia } from "elysia";
import type { PeerSyncState } from "../../routing/sync";
import { ApiError, errorBody } from "../errors";
import { type MeshHooks, ROUTE_HEADER, type Route, routeLabels } from "../mesh";
import type { PeerRow } from "../mesh-routes";
import type { ServedModel } from "../model";
import type { RunReport } from "../openai/run";
import { EventHub, type HubLimits } from "./events";
import { type RequestFilter, RequestLog, type RequestRecord } from "./log";
import { type NodeReport, nodeReport } from "./node-report";
import { consolePage } from "./page";
import { tapResponse } from "./tap";

/** Whether and to whom the console is served. */
export type ConsoleMode = "local" | "public" | "off";

/** How the console runs. */
export interface ConsoleOptions {
  mode: ConsoleMode;
  /** The node listens on a loopback address only (then "local" serves it without keys). */
  loopback: boolean;
  logCap?: number;
  hub?: Partial<HubLimits>;
  /** How often subscribers get the mesh snapshot (default 1000 ms). */
  snapshotEveryMs?: number;
}

/** What the console reads from the node. */
export interface ConsoleSource {
  nodeId(): string;
  nodeName(): string;
  models: readonly ServedModel[];
  mesh?: MeshHooks;
  apiKeyRequired: boolean;
}

/** GET /api/mesh: every member, and each one's own figures (fetched from it). */
export interface MeshSnapshot {
  at: number;
  self: string;
  members: PeerRow[];
  /** Each member's report, by node id: this node's own, peers' as last fetched; null when not reachable. */
  nodes: Record<string, NodeReport | null>;
  /** Cache decisions checked against the serving engine, per node. */
  mispredictions: Record<string, { checked: number; short: number }>;
  routing: { mode: string; decisions: unknown } | null;
}

/** GET /api/cache: the routing index per model, and each peer's sync freshness. */
export interface CacheSnapshot {
  at: number;
  models: Array<{ model: string } & ReturnType<NonNullable<ReturnType<MeshHooks["router"]["index"]["peek"]>>["summary"]>>;
  sync: PeerSyncState[];
}

// Paths of the console: the page and its data.
const DATA = new Set(["/api/requests", "/api/events", "/api/mesh", "/api/node", "/api/cache"]);
// Models summarised in a cache snapshot (each summary is a pass over that model's index).
const MAX_CACHE_MODELS = 8;
const CACHE_EVERY_TICKS = 5;
const PEER_TIMEOUT_MS = 1500;

/** The console of one node. */
export class Console {
  readonly log: RequestLog;
  readonly hub: EventHub;
  private readonly ids = new WeakMap<Request, string>();
  private readonly peerReports = new Map<string, NodeReport | null>();
  private timer: ReturnType<typeof setInterval> | null = null;
  private ticks = 0;
  private lastMesh: MeshSnapshot | null = null;

  constructor(
    readonly o: ConsoleOptions,
    private readonly src: ConsoleSource,
  ) {
    this.log = new RequestLog(o.logCap);
    this.hub = new EventHub(o.hub);
    this.hub.onActive = (active) => (active ? this.startTicking() : this.stopTicking());
  }

  /** Whether `path` belongs to the console (the page or its data). */
  static owns(path: string): boolean {
    return path === "/" || DATA.has(path) || path.startsWith("/api/requests/");
  }

  /** Whether `path` is the page itself (served without a key: it holds no data, and asks for one). */
  static isPage(path: string): boolean {
    return path === "/";
  }

  /** Why `request` for console path `path` is refused; null when it may proceed (the API key was already checked). */
  refusal(path: string, request: Request): ApiError | null {
    // Members read each other's console data (a node's page shows the whole mesh); the page itself is for people.
    if (path !== "/" && this.src.mesh?.gate.caller(request)) return null;
    if (this.o.mode === "off")
      return new ApiError(404, "invalid_request_error", "the console is off on this node (--no-console)", null, "not_found");
    if (!this.src.apiKeyRequired && !this.o.loopback && this.o.mode !== "public") {
      const message =
        "the console is served without --api-key only when the node listens on loopback; give --api-key, or --console public to serve it to anyone";
      return new ApiError(403, "invalid_request_error", message, null, "console_not_public");
    }
    return null;
  }

  /**
   * A generating request was routed: record it (sizes and hashes, routing's decision record) and hook
   * its local run, if it runs here, so its figures come from the engine. `route` null: routing failed
   * (its status comes with settle). Returns the record's id.
   */
  begin(request: Request, api: string, model: string, stream: boolean, route: Route | null, startedAt: number): string | null {
    // Off: nothing reads the log, so nothing is recorded.
    if (this.o.mode === "off") return null;
    const mesh = this.src.mesh;
    const self = this.src.nodeId();
    const id = randomBytes(8).toString("hex");
    const caller = mesh?.gate.caller(request);
    const labels = routeLabels.get(request);
    const key = route?.key ?? null;
    const decision = route?.decision ?? null;
    const record: RequestRecord = {
      id,
      at: Date.now(),
      entry: caller?.nodeId ?? self,
      servedBy: route?.kind === "here" ? self : null,
      model,
      api,
      stream,
      route: labels?.[ROUTE_HEADER.route] ?? "local",
      promptChars: key?.chars ?? null,
      promptHash: key && key.hashes.length > 0 ? (key.hashes[key.hashes.length - 1] as string) : null,
      status: null,
      promptTokens: null,
      cachedTokens: null,
      completionTokens: null,
      predictedCachedTokens: decision && mesh ? (decision.ranked[0]?.cachedTokens ?? null) : null,
      prediction: null,
      ttftMs: null,
      tokensPerS: null,
      durationMs: null,
      explanation: decision && mesh ? mesh.router.explain(model, decision) : null,
      done: false,
    };
    // Routing ran it here after all (the peers before it failed): its prediction was about another node.
    if (route?.kind === "here" && decision && !decision.target.local) record.predictedCachedTokens = null;
    this.log.add(record);
    this.ids.set(request, id);
    if (route?.kind === "here" && route.routing) {
      route.routing.onReport = (r: RunReport) => {
        const decode = (r.endedAt - r.firstTokenAt) / 1000;
        this.update(id, {
          servedBy: self,
          promptTokens: r.promptTokens,
          cachedTokens: r.cachedTokens,
          completionTokens: r.completionTokens,
          ttftMs: Math.round(r.firstTokenAt - startedAt),
          tokensPerS: r.completionTokens > 1 && decode > 0 ? (r.completionTokens - 1) / decode : null,
          durationMs: Math.round(r.endedAt - startedAt),
        });
      };
    }
    this.hub.publish("request", record);
    return id;
  }

  /** The answer of a request `begin` recorded: a relayed peer answer is read on its way through for its usage and timing. */
  answer<T>(request: Request, result: T, startedAt: number): T {
    const id = this.ids.get(request);
    if (!id || !(result instanceof Response)) return result;
    // A relayed refusal keeps its own status (the app's status hook sees 200 for a returned Response).
    if (result.status !== 200) this.log.complete(id, { status: result.status });
    const r = this.log.get(id);
    if (!r || r.servedBy !== null) return result;
    const servedBy = result.headers.get("x-mesh-served-by");
    if (servedBy) this.log.complete(id, { servedBy });
    return tapResponse(result, (t) => {
      const first = t.firstTextAt;
      const decode = first !== null ? (t.endedAt - first) / 1000 : 0;
      const u = t.usage;
      this.update(id, {
        ...(u ? { promptTokens: u.promptTokens, cachedTokens: u.cachedTokens, completionTokens: u.completionTokens } : {}),
        ttftMs: first !== null ? Math.round(first - startedAt) : null,
        tokensPerS: u && first !== null && u.completionTokens > 1 && decode > 0 ? (u.completionTokens - 1) / decode : null,
        durationMs: Math.round(t.endedAt - startedAt),
      });
      this.finishRecord(id);
    }) as T;
  }

  /** The status a recorded request was answered with (its headers left). */
  settle(request: Request, status: number): void {
    const id = this.ids.get(request);
    if (!id) return;
    const known = this.log.get(id)?.status ?? null;
    const r = this.log.complete(id, { status: known !== null && known !== 200 ? known : status });
    if (!r) return;
    status = r.status ?? status;
    // An error has no figures to wait for; a success is done once its figures are in (a stream's come at its end).
    if (status !== 200 || r.promptTokens !== null) r.done = true;
    this.hub.publish("request", r);
  }

  /** This node's report (GET /api/node). */
  node(): Promise<NodeReport> {
    return nodeReport(this.src.nodeId(), this.src.nodeName(), this.src.models, this.log.list({ limit: this.log.cap }));
  }

  /** The whole mesh as this node sees it; peers' reports are fetched (in parallel, briefly) unless `cachedPeers`. */
  async mesh(cachedPeers = false): Promise<MeshSnapshot> {
    const mesh = this.src.mesh;
    const self = this.src.nodeId();
    const members: PeerRow[] = mesh ? mesh.service.peers().members : [];
    const own = await this.node();
    if (!cachedPeers && mesh?.peerGet) {
      const live = members.filter((m) => !m.self && (m.state === "alive" || m.state === "suspect"));
      await Promise.all(
        live.map(async (m) => {
          const got = await mesh.peerGet?.(m.addr, "/api/node", PEER_TIMEOUT_MS).catch(() => null);
          this.peerReports.set(m.id, isReport(got) ? got : null);
        }),
      );
    }
    // Bounded by the members: a node that left the mesh leaves this map.
    const ids = new Set(members.map((m) => m.id));
    for (const k of this.peerReports.keys()) if (!ids.has(k)) this.peerReports.delete(k);
    const nodes: Record<string, NodeReport | null> = { [self]: own };
    for (const m of members) {
      if (m.id === self) continue;
      nodes[m.id] = m.state === "dead" || m.state === "left" ? null : (this.peerReports.get(m.id) ?? null);
    }
    const report = mesh?.figures()?.routing;
    return {
      at: Date.now(),
      self,
      members,
      nodes,
      mispredictions: this.log.mispredictions(),
      routing: report ? { mode: report.mode, decisions: report.decisions } : null,
    };
  }

  /**
   * The requests of the whole mesh: each live member's log (asked with mesh credentials, in parallel,
   * briefly), each request once, as its entry node recorded it (with its decision), newest first.
   */
  async meshRequests(f: RequestFilter): Promise<RequestRecord[]> {
    const mesh = this.src.mesh;
    const self = this.src.nodeId();
    const limit = Math.min(f.limit ?? 100, this.log.cap);
    const out = this.log.list({ ...f, limit: this.log.cap }).filter((r) => r.entry === self);
    const members = mesh ? mesh.service.peers().members : [];
    const live = members.filter((m) => !m.self && (m.state === "alive" || m.state === "suspect"));
    const qs = new URLSearchParams();
    for (const [k, v] of Object.entries({ ...f, limit })) if (v !== undefined) qs.set(k, String(v));
    const theirs = await Promise.all(
      live.map(async (m) => {
        const got = (await mesh?.peerGet?.(m.addr, `/api/requests?${qs}`, PEER_TIMEOUT_MS).catch(() => null)) as { data?: unknown } | null;
        return Array.isArray(got?.data) ? (got.data as unknown[]).filter((r): r is RequestRecord => isRecord(r) && r.entry === m.id) : [];
      }),
    );
    return out
      .concat(...theirs)
      .sort((a, b) => b.at - a.at)
      .slice(0, limit);
  }

  /** The routing index per model and the sync's freshness per peer. */
  cache(): CacheSnapshot {
    const mesh = this.src.mesh;
    if (!mesh) return { at: Date.now(), models: [], sync: [] };
    const index = mesh.router.index;
    const names = Object.keys(index.stats().models).slice(0, MAX_CACHE_MODELS);
    const models = names.flatMap((model) => {
      const m = index.peek(model);
      return m ? [{ model, ...m.summary(12) }] : [];
    });
    return { at: Date.now(), models, sync: mesh.syncPeers?.() ?? [] };
  }

  /** Stop the snapshot timer and end every subscription. */
  close(): void {
    this.stopTicking();
    this.hub.close();
  }

  /** The console's routes, as an Elysia plugin. */
  routes() {
    const json = (request: Request, value: unknown): Response => {
      const body = new TextEncoder().encode(JSON.stringify(value));
      const auth = this.src.mesh?.gate.replyHeaders(request, 200, body) ?? {};
      return new Response(body, { headers: { "content-type": "application/json", "cache-control": "no-store", ...auth } });
    };
    return new Elysia({ name: "console" })
      .get("/", async ({ request }) => {
        const page = await consolePage();
        const gzip = (request.headers.get("accept-encoding") ?? "").includes("gzip");
        const headers = {
          "content-type": "text/html; charset=utf-8",
          "cache-control": "no-cache",
          "x-content-type-options": "nosniff",
          // Everything is inline: nothing is fetched from anywhere but this node.
          "content-security-policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
          ...(gzip ? { "content-encoding": "gzip" } : {}),
        };
        return new Response(gzip ? page.gzip : page.html, { headers });
      })
      .get("/api/requests", async ({ request, query }) => {
        const f = parseFilter(query);
        if (query.scope === undefined || query.scope === "node") return json(request, { data: this.log.list(f) });
        if (query.scope !== "mesh")
          throw new ApiError(400, "invalid_request_error", "invalid 'scope': node or mesh", "scope", "invalid_value");
        return json(request, { data: await this.meshRequests(f) });
      })
      .get("/api/requests/:id", ({ request, params }) => {
        const r = this.log.get(params.id);
        if (!r) throw new ApiError(404, "invalid_request_error", `no request '${params.id}' in this node's log`, "id", "not_found");
        return json(request, r);
      })
      .get("/api/node", async ({ request }) => json(request, await this.node()))
      .get("/api/mesh", async ({ request }) => json(request, await this.mesh()))
      .get("/api/cache", ({ request }) => json(request, this.cache()))
      .get("/api/events", () => {
        const first: Array<[string, unknown]> = [["hello", { node: this.src.nodeId(), name: this.src.nodeName() }]];
        if (this.lastMesh) first.push(["mesh", this.lastMesh]);
        const stream = this.hub.subscribe(first);
        if (!stream) {
          const e = new ApiError(503, "server_error", "too many console subscribers on this node", null, "too_many_subscribers", 5);
          return new Response(JSON.stringify(errorBody(e)), {
            status: 503,
            headers: { "content-type": "application/json", "retry-after": "5" },
          });
        }
        return new Response(stream, {
          headers: { "content-type": "text/event-stream", "cache-control": "no-cache", "x-accel-buffering": "no" },
        });
      });
  }

  private update(id: string, o: Parameters<RequestLog["complete"]>[1]): void {
    const r = this.log.complete(id, o);
    if (!r) return;
    if (r.status !== null && r.promptTokens !== null) r.done = true;
    this.hub.publish("request", r);
  }

  private finishRecord(id: string): void {
    const r = this.log.finish(id);
    if (r) this.hub.publish("request", r);
  }

  private startTicking(): void {
    if (this.timer) return;
    const tick = async () => {
      this.ticks++;
      try {
        this.lastMesh = await this.mesh();
        this.hub.publish("mesh", this.lastMesh);
        if (this.ticks % CACHE_EVERY_TICKS === 1) this.hub.publish("cache", this.cache());
      } catch {
        // a snapshot that failed is skipped; the next tick tries again
      }
    };
    void tick();
    this.timer = setInterval(() => void tick(), this.o.snapshotEveryMs ?? 1000);
    // Subscribers keep the server (and so the process) alive, not this timer.
    this.timer.unref?.();
  }

  private stopTicking(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }
}

function isRecord(x: unknown): x is RequestRecord {
  const r = x as RequestRecord;
  return typeof x === "object" && x !== null && typeof r.id === "string" && typeof r.at === "number" && typeof r.entry === "string";
}

function isReport(x: unknown): x is NodeReport {
  return typeof x === "object" && x !== null && typeof (x as NodeReport).id === "string" && Array.isArray((x as NodeReport).models);
}

/** GET /api/requests's query: model, node, route, status (ok | error), limit (scope is read by the route). */
function parseFilter(q: Record<string, string | undefined>): RequestFilter {
  const f: RequestFilter = {};
  if (q.model) f.model = q.model;
  if (q.node) f.node = q.node;
  if (q.route) f.route = q.route;
  if (q.status !== undefined) {
    if (q.status !== "ok" && q.status !== "error")
      throw new ApiError(400, "invalid_request_error", "invalid 'status': ok or error", "status", "invalid_value");
    f.status = q.status;
  }
  if (q.limit !== undefined) {
    const n = Number(q.limit);
    if (!Number.isInteger(n) || n < 1 || n > 10_000) {
      throw new ApiError(400, "invalid_request_error", "invalid 'limit': a whole number from 1 to 10000", "limit", "invalid_value");
    }
    f.limit = n;
  }
  return f;
}
