import OpenAI from "openai";
import { silentLogger } from "../../src/log";
import { type RunningServer, ServedModel, startServer } from "../../src/server";
import { tinyModel } from "./model";

/** A live server on the tiny model on a free loopback port. */
export interface TestServer {
  server: RunningServer;
  model: ServedModel;
  client: OpenAI;
  url: string;
  close(): Promise<void>;
}

/** Start a server; options override the defaults (small context, 2 slots). */
export async function startTestServer(
  o: {
    apiKeys?: string[];
    maxBodyBytes?: number;
    nCtx?: number;
    nParallel?: number;
    queueCapacity?: number;
    queueTimeoutMs?: number;
    aliases?: string[];
  } = {},
): Promise<TestServer> {
  const model = ServedModel.start({
    modelPath: await tinyModel(),
    aliases: o.aliases,
    nCtx: o.nCtx ?? 4096,
    nParallel: o.nParallel ?? 2,
    threads: 2,
    queueCapacity: o.queueCapacity,
    queueTimeoutMs: o.queueTimeoutMs,
  });
  await model.ready;
  if (model.status !== "ready") throw new Error(`model failed: ${model.error}`);
  const server = startServer({
    host: "127.0.0.1",
    port: 0,
    models: [model],
    apiKeys: o.apiKeys ?? [],
    maxBodyBytes: o.maxBodyBytes ?? 1024 * 1024,
    logger: silentLogger,
  });
  const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: o.apiKeys?.[0] ?? "unused", maxRetries: 0 });
  return {
    server,
    model,
    client,
    url: server.url,
    close: async () => {
      await server.close();
      await model.close();
    },
  };
}
