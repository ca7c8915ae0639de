// The HTTP surface of a node: /v1 (OpenAI API, OpenAI Responses, Anthropic Messages), /health, /metrics.
import { createHash, timingSafeEqual } from "node:crypto";
import { hostname } from "node:os";
import { Elysia, type TSchema } from "elysia";
import type { CheckpointHydrator } from "../hydration/checkpoints";
import type { Logger } from "../log";
import { renderSplitMetrics, splitReportOf } from "../split/report";
import { anthropicMessages, checkCountTokensBody, checkMessagesBody, countTokens } from "./anthropic/messages";
import { CountTokensBody, MessagesBody } from "./anthropic/schema";
import { Console, type ConsoleOptions } from "./console";
import { backendOf, deviceEntry, renderDeviceMetrics } from "./devices";
import { ApiError, badRequest, dialectOf, errorResponse, forwardShape, pointerToParam, toApiError } from "./errors";
import type { ForwardShape } from "./forward";
import {
  type ForwardAs,
  forwardToPeer,
  type MeshHooks,
  meshModelNodes,
  meshModelOf,
  ROUTE_HEADER,
  type Route,
  rawJson,
  routeLabels,
  routeRequest,
} from "./mesh";
import { meshCheckpointRoutes } from "./mesh-checkpoints";
import { renderMeshMetrics } from "./mesh-metrics";
import { meshRoutes } from "./mesh-routes";
import type { GaugeValues, Metrics } from "./metrics";
import type { ServedModel } from "./model";
import { chatCompletion, checkChatBody } from "./openai/chat";
import { checkCompletionBody, completion } from "./openai/completions";
import { ChatBody, type ChatBodyT, CompletionBody } from "./openai/schema";
import { inputParamOfRelayed } from "./responses/relayed";
import { chatEventsOf, forwardedChatBody } from "./responses/remote";
import { answerResponse, remoteStart, runResponse } from "./responses/responses";
import { ResponsesBody } from "./responses/schema";
import { RESPONSE_STORE_DEFAULT_MIB, ResponseStore } from "./responses/store";
import { checkResponsesBody } from "./responses/translate";
import { checkSentBody } from "./sent";
import { forwardedPath, SESSION_HEADER, SessionService, type SessionTurn, sessionIdOf } from "./sessions";
import { ApplyTemplateBody, applyTemplate, DetokenizeBody, detokenize, TokenizeBody, tokenize } from "./tokenize";

/** What the app needs from the node. */
export interface AppOptions {
  models: ServedModel[];
  /** API keys (Authorization: Bearer, or x-api-key) accepted on everything but /health; empty means no auth. */
  apiKeys: string[];
  maxBodyBytes: number;
  logger: Logger;
  metrics: Metrics;
  /** The mesh this node belongs to; absent when it runs alone. */
  mesh?: MeshHooks;
  /** Past /v1/responses answers kept for previous_response_id (default: RESPONSE_STORE_DEFAULT_MIB MiB). */
  responseStore?: ResponseStore;
  /** Multi-branch agent sessions (default: SESSION_DEFAULTS). */
  sessions?: SessionService;
  /** The console (GET / and its admin API); default: served, as on a loopback listener. */
  console?: ConsoleOptions;
  /** Session checkpoints pulled from peers (mesh only): a session routed here fetches its checkpoint first. */
  hydration?: CheckpointHydrator;
}

const ROUTES = new Set([
  "/v1/chat/completions",
  "/v1/completions",
  "/v1/messages",
  "/v1/messages/count_tokens",
  "/v1/responses",
  "/v1/responses/{id}",
  "/v1/models",
  "/health",
  "/metrics",
  "/api/peers",
  "/mesh/rpc",
  "/mesh/challenge",
  "/tokenize",
  "/detokenize",
  "/apply-template",
  "/v1/sessions",
  "/",
  "/api/requests",
  "/api/requests/{id}",
  "/api/events",
  "/api/mesh",
  "/api/node",
  "/api/cache",
]);

/** A request path as the route label of its metrics and log line: a known route, or "other". */
function routeOf(path: string): string {
  if (ROUTES.has(path)) return path;
  if (/^\/v1\/sessions\/[^/]+$/.test(path)) return "/v1/sessions/{id}";
  if (/^\/v1\/sessions\/[^/]+\/trajectories$/.test(path)) return "/v1/sessions/{id}/trajectories";
  if (/^\/api\/requests\/[^/]+$/.test(path)) return "/api/requests/{id}";
  return /^\/v1\/responses\/[^/]+$/.test(path) ? "/v1/responses/{id}" : "other";
}

/** Whether a request carries one of `keys`, as `Authorization: Bearer <key>` (OpenAI's clients) or `x-api-key: <key>` (Anthropic's). */
function keyChecker(keys: string[]): (headers: Headers) => boolean {
  // Compare digests so the comparison time does not depend on the key's length or content.
  const digests = keys.map((k) => createHash("sha256").update(k).digest());
  const known = (key: string) => {
    const d = createHash("sha256").update(key.trim()).digest();
    let ok = false;
    for (const k of digests) ok = timingSafeEqual(k, d) || ok;
    return ok;
  };
  return (headers) => {
    const bearer = headers.get("authorization");
    const apiKey = headers.get("x-api-key");
    return (bearer?.startsWith("Bearer ") === true && known(bearer.slice(7))) || (apiKey !== null && known(apiKey));
  };
}

/** Put a request's routing labels (routeLabels) on its answer: a Response's headers, or Elysia's for an object. */
function labelled<T>(result: T, request: Request, set: { headers: Record<string, string | number>; status?: number | string }): T {
  // A relayed peer answer (an error included) is sent with its own status: request metrics and logs read set.status.
  if (result instanceof Response) set.status = result.status;
  const labels = routeLabels.get(request);
  if (!labels) return result;
  if (result instanceof Response) for (const [k, v] of Object.entries(labels)) result.headers.set(k, v);
  else Object.assign(set.headers, labels);
  return result;
}

/** 404 for a response id this node does not hold. */
function responseNotFound(id: string): ApiError {
  return new ApiError(404, "invalid_request_error", `Response with id '${id}' not found.`, "response_id", "not_found");
}

/** On /v1/responses the conversation is `input`: an error about the prompt (too long for the context) names it. */
function inputParam(e: unknown): unknown {
  const api = toApiError(e);
  if (api.param !== "messages") return e; // anything else goes on as it was thrown (a 500 is logged with its cause)
  return new ApiError(api.status, api.type, api.message, "input", api.code, api.retryAfter);
}

/** Build the Elysia app. */
export function createApp(o: AppOptions) {
  const authorized = o.apiKeys.length > 0 ? keyChecker(o.apiKeys) : () => true;
  const findModel = (name: string): ServedModel => {
    const m = o.models.find((x) => x.answersTo(name));
    if (!m) throw new ApiError(404, "invalid_request_error", `The model '${name}' does not exist`, "model", "model_not_found");
    return m;
  };
  /**
   * The model a requested name (an id or an alias) stands for: served here, or its id in the mesh. The
   * routing key is computed under that id, so a conversation by alias and by id shares cache.
   */
  const resolve = (name: string): { id: string; here: boolean } => {
    const local = o.models.find((x) => x.answersTo(name));
    return local ? { id: local.id, here: true } : { id: meshModelOf(o.mesh, name) ?? name, here: false };
  };
  /** Route a request that runs as the chat request `chat`: keyed under the model's id, forwarded as `shape` (or `as`). */
  const routeChat = (chat: ChatBodyT, path: string, request: Request, shape?: ForwardShape, as?: ForwardAs, stay = false) => {
    const { id, here } = resolve(chat.model);
    return routeRequest(
      o.mesh,
      id,
      here,
      path,
      request,
      (k) => k.chat(id, chat.messages, chat.tools ?? undefined),
      chat.model,
      shape,
      as,
      stay,
    );
  };
  const sessions = o.sessions ?? new SessionService(() => o.models, {}, o.logger);
  /** The session a chat-shaped request names (checked before anything moves), and whether this node holds it. */
  const sessionOf = (request: Request, body: object) => {
    const id = sessionIdOf(request, body);
    if (id !== null) sessions.store.check(id);
    // Affinity: a session this node holds runs here, next to its checkpoints.
    return { id, held: id !== null && sessions.store.peek(id) !== undefined };
  };
  /** The turn of a session request that runs here; none without a session. */
  const sessionTurn = async (s: { id: string | null; held: boolean }, model: ServedModel, chat: ChatBodyT): Promise<SessionTurn | null> => {
    if (s.id === null) return null;
    // A session that runs here but whose checkpoint a peer holds: fetch it first (the priority lane: never
    // behind the background pass), so the turn restores it instead of prefilling the whole history.
    if (!s.held && o.hydration) await o.hydration.prepare(s.id, model.id);
    return sessions.turn(s.id, model, chat);
  };
  /** Answers of a session request carry its id back. */
  const sessionHeader = (id: string | null, result: Response | object, set: { headers: Record<string, unknown> }) => {
    if (id === null) return;
    if (result instanceof Response) result.headers.set(SESSION_HEADER, id);
    else set.headers[SESSION_HEADER] = id;
  };
  /**
   * A tokenizer endpoint: run `handle` on the model named (default: this node's first), or forward the
   * request to a peer serving it.
   */
  const tokenizerRoute =
    <B extends { model?: string }>(path: string, handle: (m: ServedModel, body: B) => Promise<object> | object) =>
    async ({ body, request }: { body: B; request: Request }) => {
      const name = body.model ?? o.models[0]?.id;
      if (name === undefined) throw badRequest("missing required parameter 'model': this node serves no model", "model");
      const { id, here } = resolve(name);
      if (!here) return forwardToPeer(o.mesh, id, name, path, request);
      return handle(findModel(name), body);
    };
  const onStreamError = (e: unknown) => {
    const api = toApiError(e);
    if (api.status >= 500) o.logger.error("stream failed", { status: api.status, code: api.code, error: (e as Error)?.message });
    return api;
  };
  const gauges = async (): Promise<GaugeValues | null> => {
    const engines = o.models.flatMap((m) => (m.engine ? [m.engine] : []));
    if (engines.length === 0) return null;
    const all = (await Promise.all(engines.map((e) => e.stats().catch(() => null)))).filter((x) => x !== null);
    if (all.length === 0) return null;
    // Every field is a count, so a node's figure is the sum over its engines.
    const g = { ...(all[0] as GaugeValues) };
    for (const s of all.slice(1)) {
      for (const k of Object.keys(g) as (keyof GaugeValues)[]) g[k] += s[k];
    }
    return g;
  };
  const started = new WeakMap<Request, number>();
  const selfId = () => o.mesh?.service.nodeId() ?? hostname();
  const con = new Console(o.console ?? { mode: "local", loopback: true }, {
    nodeId: selfId,
    nodeName: () => o.mesh?.service.info().name ?? hostname(),
    models: o.models,
    mesh: o.mesh,
    apiKeyRequired: o.apiKeys.length > 0,
  });
  /** Record a routed generating request in the console's log (its local run reports there when it ends). */
  const traced = async (request: Request, api: string, model: string, stream: boolean | null | undefined, routing: Promise<Route>) => {
    const t0 = started.get(request) ?? performance.now();
    try {
      const route = await routing;
      con.begin(request, api, model, stream === true, route, t0);
      return route;
    } catch (e) {
      // Routing itself failed (no node serves it, every peer failed): logged too, with the status it gets.
      con.begin(request, api, model, stream === true, null, t0);
      throw e;
    }
  };
  /** The answer of a traced request: labelled with where it ran, and read on its way through when a peer ran it. */
  const answered = <T>(result: T, request: Request, set: { headers: Record<string, string | number> }): T =>
    labelled(con.answer(request, result, started.get(request) ?? performance.now()), request, set);
  const responses = o.responseStore ?? new ResponseStore(RESPONSE_STORE_DEFAULT_MIB * 1024 * 1024);
  /**
   * A route's body options: its schema, its parser (rawJson keeps the bytes a peer is sent; the tokenizer
   * routes use it even without a mesh), and the check of the body as sent, before validation coerces it.
   */
  const bodyOf = <S extends TSchema>(schema: S, parse: "json" | typeof rawJson = o.mesh ? rawJson : "json") => ({
    body: schema,
    parse,
    transform: checkSentBody(schema),
  });

  return new Elysia()
    .wrap(
      // Every answer says who served it and why: routed requests carry their labels already; everything else ran here.
      (handle) =>
        async (...args: unknown[]) => {
          const response: unknown = await handle(...args);
          if (response instanceof Response && !response.headers.has(ROUTE_HEADER.node)) {
            try {
              response.headers.set(ROUTE_HEADER.node, selfId());
              if (!response.headers.has(ROUTE_HEADER.route)) response.headers.set(ROUTE_HEADER.route, "local");
            } catch {
              // immutable headers (a relayed fetch response): it carries the peer's own
            }
          }
          return response;
        },
    )
    .onRequest(async ({ request }) => {
      started.set(request, performance.now());
      const path = new URL(request.url).pathname;
      // Answered here, before routing: onAfterResponse never sees these, so count and log them now.
      const early = (e: ApiError) => {
        const route = routeOf(path);
        o.metrics.requests.inc({ route, status: String(e.status) });
        o.logger.info("request", { method: request.method, route, status: String(e.status), ms: 0 });
        return errorResponse(e, dialectOf(path));
      };
      if (o.mesh?.gate.claims(request)) {
        // Mesh credentials stand in for the API key (a forwarded request); when present they must verify.
        const refused = await o.mesh.gate.check(request);
        if (refused) return early(refused);
      } else if (path !== "/health" && !path.startsWith("/mesh/") && !Console.isPage(path) && !authorized(request.headers)) {
        const message = "a valid API key is required (Authorization: Bearer <key>, or x-api-key: <key>)";
        return early(new ApiError(401, "invalid_request_error", message, null, "invalid_api_key"));
      }
      if (Console.owns(path)) {
        const refused = con.refusal(path, request);
        if (refused) return early(refused);
      }
      const length = Number(request.headers.get("content-length") ?? 0);
      if (length > o.maxBodyBytes) {
        const message = `the request body is ${length} bytes; the limit is ${o.maxBodyBytes}`;
        return early(new ApiError(413, "invalid_request_error", message, null, "request_too_large"));
      }
    })
    .onError(({ code, error, set, request }) => {
      const reply = (e: ApiError) => {
        set.status = e.status; // so request metrics and logs see the status actually sent
        return labelled(errorResponse(e, dialectOf(new URL(request.url).pathname)), request, set);
      };
      if (code === "PARSE") return reply(badRequest("the request body is not valid JSON", null, "invalid_json"));
      if (code === "VALIDATION") {
        const ve = (error as { valueError?: { path?: string; message?: string; schema?: { error?: unknown } } }).valueError;
        const param = ve?.path ? pointerToParam(ve.path) : null;
        const custom = ve?.schema?.error;
        const detail = typeof custom === "string" ? custom : (ve?.message ?? "invalid value");
        const missing = ve?.message?.startsWith("Expected required property");
        return reply(badRequest(missing ? `missing required parameter '${param}'` : `invalid '${param}': ${detail}`, param));
      }
      if (code === "NOT_FOUND") return reply(new ApiError(404, "invalid_request_error", "unknown route", null, "not_found"));
      const api = toApiError(error);
      // The engine refuses these before its own admission counters see them.
      if (api.code === "server_busy") o.metrics.rejectedServerBusy();
      if (api.status >= 500) o.logger.error("request failed", { status: api.status, code: api.code, error: (error as Error)?.message });
      return reply(api);
    })
    .onBeforeHandle(({ request, server }) => {
      // The listener's idle timeout guards against clients that stall before
      // their body is read; once a request is parsed, a long generation with
      // sparse output must never be cut. Bun 1.4 already spares a request
      // awaiting its response; this keeps that true whatever Bun does next.
      server?.timeout(request, 0);
    })
    .onAfterResponse(({ request, set }) => {
      const path = new URL(request.url).pathname;
      const route = routeOf(path);
      const status = String(typeof set.status === "number" ? set.status : 200);
      o.metrics.requests.inc({ route, status });
      con.settle(request, Number(status));
      const t0 = started.get(request);
      // Peer traffic (probes every second) and the console's polling would drown the log at info; their failures still show at info.
      const quiet = (path.startsWith("/mesh/") || (Console.owns(path) && path !== "/")) && status === "200";
      o.logger[quiet ? "debug" : "info"]("request", {
        method: request.method,
        route,
        status,
        ms: t0 ? Math.round(performance.now() - t0) : undefined,
      });
    })
    .get("/health", ({ set }) => {
      const states = o.models.map((m) => ({ id: m.id, status: m.status, ...(m.error ? { error: m.error } : {}) }));
      const ready = o.models.length > 0 && o.models.every((m) => m.status === "ready");
      set.status = ready ? 200 : 503;
      return { status: ready ? "ok" : o.models.some((m) => m.status === "failed") ? "failed" : "loading", models: states };
    })
    .get("/v1/models", () => {
      // Each alias is an entry of its own (clients look their model name up in this list), saying whose alias it is.
      const nodes = meshModelNodes(o.mesh);
      const local = o.models.flatMap((m) => {
        const entry = (id: string, alias: boolean) => ({
          id,
          object: "model",
          created: 0,
          owned_by: "mesh",
          status: m.status,
          context_length: m.info?.nCtxSeq ?? null,
          random_weights: m.info?.randomWeights ?? null,
          ...(m.info ? { backend: backendOf(m.info), devices: m.info.devices.map(deviceEntry), gpu_layers: m.info.offload.layers } : {}),
          ...(alias ? { alias_of: m.id } : m.aliases.length > 0 ? { aliases: [...m.aliases] } : {}),
          ...(splitReportOf(m.engine) ? { split: splitReportOf(m.engine) } : {}),
          ...(o.mesh ? { nodes: nodes.get(id) ?? [] } : {}),
        });
        return [entry(m.id, false), ...m.aliases.map((a) => entry(a, true))];
      });
      const remote = [...nodes].filter(([name]) => !o.models.some((m) => m.answersTo(name)));
      const elsewhere = remote.map(([name, on]) => {
        const id = meshModelOf(o.mesh, name);
        return {
          id: name,
          object: "model",
          created: 0,
          owned_by: "mesh",
          status: "remote",
          ...(id !== name ? { alias_of: id } : {}),
          nodes: on,
        };
      });
      return { object: "list", data: [...local, ...elsewhere] };
    })
    .get("/metrics", async ({ set }) => {
      set.headers["content-type"] = "text/plain; version=0.0.4";
      const splits = o.models.flatMap((m) => splitReportOf(m.engine) ?? []);
      const text = o.metrics.render(await gauges()) + renderDeviceMetrics(o.models) + renderSplitMetrics(splits);
      const mesh = o.mesh?.figures();
      const hydration = o.hydration ? `${o.hydration.renderMetrics()}\n` : "";
      const files = o.mesh?.files?.metrics() ?? "";
      return `${mesh ? `${text}${renderMeshMetrics(mesh)}\n` : text}${hydration}${files}`;
    })
    .post(
      "/v1/chat/completions",
      async ({ body, request, set }) => {
        checkChatBody(body);
        const session = sessionOf(request, body);
        const route = await traced(
          request,
          "/v1/chat/completions",
          body.model,
          body.stream,
          routeChat(body, forwardedPath("/v1/chat/completions", session.id), request, undefined, undefined, session.held),
        );
        if (route.kind === "peer") {
          sessionHeader(session.id, route.response, set);
          return answered(route.response, request, set);
        }
        const model = findModel(body.model);
        const turn = await sessionTurn(session, model, body);
        const result = await chatCompletion(model, body, o.metrics, request.signal, onStreamError, route.routing, turn);
        sessionHeader(session.id, result, set);
        if (!(result instanceof Response)) set.status = 200;
        return answered(result, request, set);
      },
      bodyOf(ChatBody),
    )
    .post(
      "/v1/completions",
      async ({ body, request, set }) => {
        checkCompletionBody(body);
        const prompt = typeof body.prompt === "string" ? body.prompt : (body.prompt[0] ?? "");
        const { id, here } = resolve(body.model);
        const routed = routeRequest(o.mesh, id, here, "/v1/completions", request, (k) => k.completion(id, prompt), body.model);
        const route = await traced(request, "/v1/completions", body.model, body.stream, routed);
        if (route.kind === "peer") return answered(route.response, request, set);
        const result = await completion(findModel(body.model), body, o.metrics, request.signal, onStreamError, route.routing);
        return answered(result, request, set);
      },
      bodyOf(CompletionBody),
    )
    .post(
      "/v1/messages",
      async ({ body, request, set }) => {
        // Checked and translated before anything moves: routed, keyed and run as the equivalent chat request.
        const chat = checkMessagesBody(body);
        const session = sessionOf(request, body);
        const path = forwardedPath("/v1/messages", session.id);
        const routed = routeChat(chat, path, request, forwardShape("anthropic"), undefined, session.held);
        const route = await traced(request, "/v1/messages", chat.model, body.stream, routed);
        if (route.kind === "peer") {
          sessionHeader(session.id, route.response, set);
          return answered(route.response, request, set);
        }
        const model = findModel(chat.model);
        const turn = await sessionTurn(session, model, chat);
        const result = await anthropicMessages(model, body, chat, o.metrics, request.signal, onStreamError, route.routing, turn);
        sessionHeader(session.id, result, set);
        if (!(result instanceof Response)) set.status = 200;
        return answered(result, request, set);
      },
      bodyOf(MessagesBody),
    )
    .post(
      "/v1/responses",
      async ({ body, request, set }) => {
        // Checked and translated before anything moves (previous_response_id expanded from this node's store),
        // then routed, keyed and run as the equivalent chat request. A peer is sent that chat request, whole and
        // self-contained, and this node answers and stores the response from the peer's chat stream.
        const req = checkResponsesBody(body, responses);
        const { chat } = req;
        const ctx = { body, req, store: responses, onStreamError };
        const session = sessionOf(request, body);
        const routed = routeChat(
          chat,
          "/v1/responses",
          request,
          undefined,
          { path: forwardedPath("/v1/chat/completions", session.id), body: () => forwardedChatBody(chat) },
          session.held,
        );
        const route = await traced(request, "/v1/responses", chat.model, body.stream, routed);
        if (route.kind === "peer") {
          // A refusal (429, 413, a 400 of the peer's) is relayed as it is: OpenAI's error shape, as here.
          if (route.response.status !== 200) {
            const relayed = await inputParamOfRelayed(route.response);
            sessionHeader(session.id, relayed, set);
            return answered(relayed, request, set);
          }
          const served = route.response.headers.get(ROUTE_HEADER.servedBy);
          const servedHeaders: Record<string, string> = served ? { [ROUTE_HEADER.servedBy]: served, [ROUTE_HEADER.node]: served } : {};
          const start = remoteStart(request.signal);
          // The peer's chat stream is read on its way into the answer: its usage and timing go to the request log.
          const upstream = con.answer(request, route.response, started.get(request) ?? performance.now());
          const result = await answerResponse(ctx, start, chatEventsOf(upstream, start.abort.signal), servedHeaders);
          sessionHeader(session.id, result, set);
          if (!(result instanceof Response)) {
            set.status = 200;
            Object.assign(set.headers, servedHeaders);
          }
          return labelled(result, request, set);
        }
        const model = findModel(chat.model);
        const turn = await sessionTurn(session, model, chat);
        const result = await runResponse(ctx, model, o.metrics, request.signal, route.routing, turn).catch((e: unknown) => {
          throw inputParam(e);
        });
        sessionHeader(session.id, result, set);
        if (!(result instanceof Response)) set.status = 200;
        return answered(result, request, set);
      },
      bodyOf(ResponsesBody),
    )
    .get("/v1/responses/:id", ({ params }) => {
      const stored = responses.get(params.id);
      if (!stored) throw responseNotFound(params.id);
      return stored.response;
    })
    .delete("/v1/responses/:id", ({ params }) => {
      if (!responses.delete(params.id)) throw responseNotFound(params.id);
      return { id: params.id, object: "response.deleted", deleted: true };
    })
    .post(
      "/v1/messages/count_tokens",
      async ({ body, request }) => {
        const chat = checkCountTokensBody(body);
        const { id, here } = resolve(chat.model);
        // Counting needs the model's tokenizer and template, not its cache: any node serving it answers.
        if (!here) return forwardToPeer(o.mesh, id, chat.model, "/v1/messages/count_tokens", request, forwardShape("anthropic"));
        return countTokens(findModel(chat.model), chat);
      },
      bodyOf(CountTokensBody),
    )
    .get("/v1/sessions", () => sessions.list())
    .get("/v1/sessions/:id", ({ params }) => {
      const from = o.hydration?.sourceOf(params.id);
      const s = sessions.get(params.id);
      // Where the checkpoint its first turn here restored came from, when a peer's.
      return from ? { ...s, checkpoint_hydrated_from: { node_id: from.node, node: from.name, tokens: from.tokens } } : s;
    })
    .delete("/v1/sessions/:id", ({ params }) => sessions.delete(params.id))
    .get("/v1/sessions/:id/trajectories", ({ params, query, request }) => {
      const all = query.all === "1" || query.all === "true";
      const accept = request.headers.get("accept") ?? "";
      if (query.format === "jsonl" || accept.includes("application/x-ndjson") || accept.includes("application/jsonl")) {
        return sessions.jsonl(params.id, all);
      }
      if (query.format !== undefined && query.format !== "json") throw badRequest("format must be json or jsonl", "format");
      return { object: "list", data: sessions.trajectories(params.id, all) };
    })
    .post("/tokenize", tokenizerRoute("/tokenize", tokenize), bodyOf(TokenizeBody, rawJson))
    .post("/detokenize", tokenizerRoute("/detokenize", detokenize), bodyOf(DetokenizeBody, rawJson))
    .post("/apply-template", tokenizerRoute("/apply-template", applyTemplate), bodyOf(ApplyTemplateBody, rawJson))
    .use(con.routes())
    .use(o.mesh ? meshCheckpointRoutes({ gate: o.mesh.gate, models: o.models }) : new Elysia())
    .use(
      o.mesh
        ? meshRoutes({
            gate: o.mesh.gate,
            service: o.mesh.service,
            apiKeyRequired: o.mesh.apiKeyRequired,
            logger: o.logger,
            files: () => o.mesh?.files,
          })
        : new Elysia(),
    );
}

/** The Elysia app type, for tests. */
export type App = ReturnType<typeof createApp>;
