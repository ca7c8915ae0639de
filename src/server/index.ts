// Start and stop a node's HTTP server.
import type { Logger } from "../log";
import type { SessionStoreOptions } from "../sessions";
import { type App, createApp } from "./app";
import type { ConsoleOptions } from "./console";
import type { NodeHydration } from "./hydration";
import type { MeshHooks } from "./mesh";
import { Metrics } from "./metrics";
import type { ServedModel } from "./model";
import { ResponseStore } from "./responses/store";
import { SessionService } from "./sessions";

export { ServedModel } from "./model";

/** How to run the server. */
export interface ServerOptions {
  host: string;
  port: number;
  models: ServedModel[];
  apiKeys: string[];
  maxBodyBytes: number;
  logger: Logger;
  /** The mesh this node belongs to, if any. */
  mesh?: MeshHooks;
  /** Seconds a connection may sit idle before a request is parsed (default 60; Bun caps it at 255). */
  idleTimeoutSeconds?: number;
  /** Bytes of past responses kept for previous_response_id (default 64 MiB). */
  responseStoreBytes?: number;
  /** Session expiry and count bound (defaults: SESSION_DEFAULTS). */
  sessions?: Partial<SessionStoreOptions>;
  /** The web console (default: served, as on a loopback listener). */
  console?: ConsoleOptions;
  /** Checkpoint hydration (mesh only): announces this node's sessions, pulls those routed here. */
  hydration?: NodeHydration;
}

/** A running server. */
export interface RunningServer {
  app: App;
  url: string;
  port: number;
  /** Stop accepting connections; in-flight requests continue. */
  stopAccepting(): void;
  /** Close every connection, idle keep-alive ones included. */
  close(): Promise<void>;
}

/** Listen; throws the listen error (e.g. EADDRINUSE) to the caller. */
export function startServer(o: ServerOptions): RunningServer {
  const sessions = new SessionService(() => o.models, o.sessions ?? {}, o.logger);
  o.hydration?.attach(sessions);
  const app = createApp({
    sessions,
    models: o.models,
    apiKeys: o.apiKeys,
    maxBodyBytes: o.maxBodyBytes,
    logger: o.logger,
    metrics: new Metrics(),
    mesh: o.mesh,
    ...(o.console ? { console: o.console } : {}),
    ...(o.hydration ? { hydration: o.hydration.hydrator } : {}),
    ...(o.responseStoreBytes !== undefined ? { responseStore: new ResponseStore(o.responseStoreBytes) } : {}),
  });
  // idleTimeout: a client that sends headers and stalls is dropped after this
  // long; every parsed request lifts it for itself (app.ts onBeforeHandle), so
  // a long generation with sparse output is never cut.
  // The cap is checked on Content-Length first (an OpenAI-shaped 413); Bun's own
  // limit, above it, only stops chunked bodies that declare no length.
  // reusePort false: Elysia enables it by default, which lets a second node start on a
  // port already in use and silently share its traffic.
  app.listen({
    hostname: o.host,
    port: o.port,
    idleTimeout: o.idleTimeoutSeconds ?? 60,
    maxRequestBodySize: o.maxBodyBytes * 2 + 65536,
    reusePort: false,
  });
  const server = app.server;
  if (!server) throw new Error("server did not start");
  const shownHost = o.host.includes(":") ? `[${o.host}]` : o.host;
  return {
    app,
    url: `http://${shownHost}:${server.port}`,
    port: server.port as number,
    // Not awaited: an idle keep-alive connection lasts until the idle
    // timeout, so waiting here would delay shutdown by that much.
    stopAccepting: () => {
      void server.stop(false);
    },
    close: async () => {
      o.hydration?.stop();
      sessions.close();
      await server.stop(true);
    },
  };
}
