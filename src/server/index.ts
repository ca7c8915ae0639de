// Start and stop a node's HTTP server.
import type { Logger } from "../log";
import { type App, createApp } from "./app";
import type { MeshHooks } from "./mesh";
import { Metrics } from "./metrics";
import type { ServedModel } from "./model";

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
  const app = createApp({
    models: o.models,
    apiKeys: o.apiKeys,
    maxBodyBytes: o.maxBodyBytes,
    logger: o.logger,
    metrics: new Metrics(),
    mesh: o.mesh,
  });
  // idleTimeout 0: a long generation with sparse output must never be cut by Bun's 10 s idle default.
  // The cap is checked on Content-Length first (an OpenAI-shaped 413); Bun's own
  // limit, above it, only stops chunked bodies that declare no length.
  // reusePort false: Elysia enables it by default, which lets a second node start on a
  // port already in use and silently share its traffic.
  app.listen({ hostname: o.host, port: o.port, idleTimeout: 0, maxRequestBodySize: o.maxBodyBytes * 2 + 65536, reusePort: false });
  const server = app.server;
  if (!server) throw new Error("server did not start");
  const shownHost = o.host.includes(":") ? `[${o.host}]` : o.host;
  return {
    app,
    url: `http://${shownHost}:${server.port}`,
    port: server.port as number,
    // Not awaited: with idleTimeout 0 an idle keep-alive connection never
    // closes by itself, so waiting here would hang shutdown.
    stopAccepting: () => {
      void server.stop(false);
    },
    close: async () => {
      await server.stop(true);
    },
  };
}
