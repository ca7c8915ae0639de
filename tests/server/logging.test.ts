import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createLogger, type LogFormat } from "../../src/log";
import { type RunningServer, ServedModel, startServer } from "../../src/server";
import { tinyModel } from "../helpers/model";

// Prompts are the users' data: they must never reach the log (at info level,
// what a node writes by default) nor a /metrics label, whatever the request's fate.
// Short and early in each prompt, so even a clipped or partial copy of a prompt would still show it.
const MARKER = `zq${crypto.randomUUID().slice(0, 8)}xv`;

let model: ServedModel;
const servers: Array<{ format: LogFormat; server: RunningServer; lines: string[] }> = [];

beforeAll(async () => {
  model = ServedModel.start({ modelPath: await tinyModel(), nCtx: 1024, nParallel: 2, threads: 2 });
  await model.ready;
  if (model.status !== "ready") throw new Error(`model failed: ${model.error}`);
  for (const format of ["text", "json"] as const) {
    const lines: string[] = [];
    const logger = createLogger(format, "info", (l) => lines.push(l));
    const server = startServer({ host: "127.0.0.1", port: 0, models: [model], apiKeys: [], maxBodyBytes: 1024 * 1024, logger });
    servers.push({ format, server, lines });
  }
});
afterAll(async () => {
  for (const s of servers) await s.server.close();
  await model?.close();
});

const user = (content: string) => [{ role: "user", content }];

/** Requests that carry the marker in their prompt, each ending differently, with the status each must get. */
const requests: Array<{ what: string; path: string; body: string; status: number }> = [
  {
    what: "a served chat request",
    path: "/v1/chat/completions",
    body: JSON.stringify({ model: "mesh-tiny", messages: user(`Repeat after me: ${MARKER}`), max_tokens: 3 }),
    status: 200,
  },
  {
    what: "a streamed chat request",
    path: "/v1/chat/completions",
    body: JSON.stringify({ model: "mesh-tiny", messages: user(`Repeat after me: ${MARKER}`), max_tokens: 3, stream: true }),
    status: 200,
  },
  {
    what: "a served completions request",
    path: "/v1/completions",
    body: JSON.stringify({ model: "mesh-tiny", prompt: `Repeat after me: ${MARKER}`, max_tokens: 3 }),
    status: 200,
  },
  {
    what: "a request failing validation",
    path: "/v1/chat/completions",
    body: JSON.stringify({ model: "mesh-tiny", messages: [{ role: "narrator", content: MARKER }], max_tokens: 3 }),
    status: 400,
  },
  {
    what: "a request for an unknown model",
    path: "/v1/chat/completions",
    body: JSON.stringify({ model: "no-such-model", messages: user(MARKER), max_tokens: 3 }),
    status: 404,
  },
  {
    what: "a prompt longer than the context",
    path: "/v1/chat/completions",
    body: JSON.stringify({ model: "mesh-tiny", messages: user(`${MARKER} `.repeat(200)), max_tokens: 3 }),
    status: 400,
  },
  {
    what: "a body that is not JSON",
    path: "/v1/chat/completions",
    body: `{"model": "mesh-tiny", "messages": [{"role": "user", "content": "${MARKER}"`,
    status: 400,
  },
];

describe("prompt text stays out of logs and metrics", () => {
  test("no_prompt_text_in_info_logs_or_metrics_for_served_refused_and_failed_requests", async () => {
    for (const { format, server, lines } of servers) {
      for (const r of requests) {
        const res = await fetch(`${server.url}${r.path}`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: r.body,
        });
        expect({ format, what: r.what, status: res.status }).toEqual({ format, what: r.what, status: r.status });
        // Read to the end: a stream's request line is logged once the response is done.
        await res.text();
      }
      // An unknown path must not become a label (nor a log field) either.
      expect((await fetch(`${server.url}/v1/${MARKER}`)).status).toBe(404);
      const metrics = await (await fetch(`${server.url}/metrics`)).text();
      expect(metrics).toContain("mesh_http_requests_total");
      expect(metrics).not.toContain(MARKER);

      // The capture works: every request above left its line (logged after the response, so wait for the last).
      const requestLines = () => lines.filter((l) => l.includes("request")).length;
      for (let i = 0; i < 2000 && requestLines() < requests.length + 2; i++) await Bun.sleep(5);
      expect(requestLines()).toBeGreaterThanOrEqual(requests.length + 2);
      if (format === "json") for (const l of lines) expect(JSON.parse(l).msg).toBeString();
      const leaked = lines.filter((l) => l.includes(MARKER));
      expect({ format, leaked }).toEqual({ format, leaked: [] });
    }
  });
});
