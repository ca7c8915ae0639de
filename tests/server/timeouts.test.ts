import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { connect } from "node:net";
import { silentLogger } from "../../src/log";
import { type RunningServer, ServedModel, startServer } from "../../src/server";
import { tinyModel } from "../helpers/model";

let model: ServedModel;
let server: RunningServer;

beforeAll(async () => {
  model = ServedModel.start({ modelPath: await tinyModel(), nCtx: 4096, nParallel: 1, threads: 2 });
  await model.ready;
  server = startServer({
    host: "127.0.0.1",
    port: 0,
    models: [model],
    apiKeys: [],
    maxBodyBytes: 1 << 20,
    logger: silentLogger,
    idleTimeoutSeconds: 1,
  });
});
afterAll(async () => {
  await server?.close();
  await model?.close();
});

describe("connection timeouts", () => {
  test("a_client_that_stalls_before_sending_its_body_is_dropped", async () => {
    const closed = await new Promise<boolean>((resolve) => {
      const sock = connect(server.port, "127.0.0.1", () => {
        sock.write("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{");
      });
      const guard = setTimeout(() => {
        sock.destroy();
        resolve(false);
      }, 30_000);
      sock.on("close", () => {
        clearTimeout(guard);
        resolve(true);
      });
      sock.on("error", () => undefined);
    });
    expect(closed).toBe(true);
  });

  test("a_silent_generation_longer_than_the_idle_timeout_is_not_cut", async () => {
    // Non-streaming: no byte leaves the server until the whole answer is ready.
    const t0 = performance.now();
    const r = await fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: model.id, prompt: "Once", max_tokens: 3000, temperature: 0, ignore_eos: true }),
    });
    const elapsed = performance.now() - t0;
    expect(r.status).toBe(200);
    const body = (await r.json()) as { usage: { completion_tokens: number } };
    expect(body.usage.completion_tokens).toBeGreaterThan(2000);
    // Only meaningful if it outlasted the timeout; 3000 tokens take seconds even on a fast machine.
    expect(elapsed).toBeGreaterThan(1000);
  });
});
