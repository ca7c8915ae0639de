import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { connect } from "node:net";
import { silentLogger } from "../../src/log";
import { type RunningServer, ServedModel, startServer } from "../../src/server";
import { tinyModel } from "../helpers/model";

let model: ServedModel;
let server: RunningServer;

beforeAll(async () => {
  model = ServedModel.start({ modelPath: await tinyModel(), nCtx: 16384, nParallel: 1, threads: 2 });
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

  test("a_silent_request_longer_than_the_idle_timeout_is_not_cut", async () => {
    // One slot: a long stream holds it while a non-streaming request waits
    // behind it, silent, for as long as we keep the stream going (not as long
    // as the machine happens to take).
    const holder = new AbortController();
    const stream = await fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: model.id, prompt: "Once", max_tokens: 16000, temperature: 0, ignore_eos: true, stream: true }),
      signal: holder.signal,
    });
    expect(stream.status).toBe(200);
    const t0 = performance.now();
    const silent = fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: model.id, prompt: "Twice", max_tokens: 4, temperature: 0 }),
    });
    // Bun checks idle timeouts every few seconds: stay silent well past that.
    await Bun.sleep(8000);
    holder.abort();
    const r = await silent;
    expect(r.status).toBe(200);
    expect(((await r.json()) as { usage: { completion_tokens: number } }).usage.completion_tokens).toBe(4);
    expect(performance.now() - t0).toBeGreaterThan(7500);
  });
});
