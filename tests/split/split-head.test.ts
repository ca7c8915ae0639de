// A split head whose stage stops answering without closing its connection (the
// machine lost power or the network, the process was stopped): only the mesh's
// membership can tell, and the head must act on it instead of waiting for good.
import { afterAll, describe, expect, test } from "bun:test";
import { createServer, connect as netConnect, type Server, type Socket } from "node:net";
import { collect, EngineError } from "../../src/engine/index";
import { silentLogger } from "../../src/log";
import { SplitEngine } from "../../src/split/head";
import type { StageOffer } from "../../src/split/offer";
import { startStageServer } from "../../src/split/stage-server";
import { serveTunnel, type TunnelServer } from "../../src/split/tunnel";
import { tinyModel } from "../helpers/model";

const SECRET = "split-head-test-secret";
const closers: Array<() => Promise<void> | void> = [];
afterAll(async () => {
  for (const c of closers.splice(0).reverse()) await c();
});

// A relay in front of a stage's tunnel that can go silent: bytes stop flowing both ways, sockets stay open.
async function silencingRelay(port: number, silentAfterBytes = Number.POSITIVE_INFINITY): Promise<{ port: number; silence(): void }> {
  let silent = false;
  let forwarded = 0;
  const socks = new Set<Socket>();
  const server: Server = createServer((inner) => {
    const outer = netConnect({ host: "127.0.0.1", port, noDelay: true });
    inner.setNoDelay(true);
    for (const s of [inner, outer]) {
      socks.add(s);
      s.on("error", () => {});
      s.on("close", () => socks.delete(s));
    }
    inner.on("data", (d: Buffer) => {
      forwarded += d.length;
      if (forwarded > silentAfterBytes) silent = true;
      if (!silent) outer.write(d);
    });
    outer.on("data", (d: Buffer) => {
      if (!silent) inner.write(d);
    });
    inner.on("close", () => outer.destroy());
    outer.on("close", () => inner.destroy());
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  closers.push(() => {
    for (const s of socks) s.destroy();
    return new Promise<void>((r) => server.close(() => r()));
  });
  return {
    port: (server.address() as { port: number }).port,
    silence: () => {
      silent = true;
    },
  };
}

describe("split head", () => {
  test("fails_in_flight_requests_and_re_plans_when_a_silent_stage_leaves_the_membership", async () => {
    const modelPath = await tinyModel();
    const rpc = await startStageServer({ cacheDir: null, threads: 1 });
    if ("code" in rpc) throw new Error(rpc.message);
    const t: TunnelServer = await serveTunnel({ host: "127.0.0.1", port: 0, secret: SECRET, rpcPort: rpc.port });
    closers.push(() => t.close());
    const relay = await silencingRelay(t.port);
    let alive = true;
    const offer: StageOffer = {
      nodeId: "stage-node-a",
      tunnel: `127.0.0.1:${relay.port}`,
      budget: 1 << 30,
      device: { name: "CPU", type: "cpu", free: 1 << 30, total: 1 << 30 },
      inUse: false,
    };
    const head = await SplitEngine.start({
      model: "tiny",
      engine: { modelPath, nCtx: 1024, nParallel: 1, nBatch: 256, threads: 1 },
      want: { kind: "count", nodes: 2 },
      headId: "head-node",
      secret: SECRET,
      offers: () => (alive ? [offer] : []),
      maxRttMs: 10_000,
      waitMs: 0,
      logger: silentLogger,
    });
    closers.push(() => head.close());
    expect(head.report().state).toBe("split");
    const opts = { prompt: "The quick brown fox", maxTokens: 8, ignoreEos: true, sampling: { temperature: 0 } };
    expect((await collect(head.generate(opts))).tokens.length).toBe(8);

    // The stage goes silent mid-generation; later the mesh's membership stops counting it alive.
    relay.silence();
    const stuck = collect(head.generate({ ...opts, maxTokens: 200 })).then(
      () => "finished",
      (e: unknown) => (e instanceof EngineError ? e.code : String(e)),
    );
    await Bun.sleep(200);
    alive = false;
    const hung = new Promise<string>((r) => setTimeout(() => r("still waiting"), 30_000).unref());
    expect(await Promise.race([stuck, hung])).toBe("engine_closed");
    await Promise.race([head.whenSettled(), hung]);
    expect(head.report().state).toBe("solo");
    expect((await collect(head.generate(opts))).tokens.length).toBe(8);
  }, 120_000);

  test("fails_a_load_instead_of_hanging_when_a_stage_goes_silent_mid_load_and_leaves_the_membership", async () => {
    const modelPath = await tinyModel();
    const rpc = await startStageServer({ cacheDir: null, threads: 1 });
    if ("code" in rpc) throw new Error(rpc.message);
    const t: TunnelServer = await serveTunnel({ host: "127.0.0.1", port: 0, secret: SECRET, rpcPort: rpc.port });
    closers.push(() => t.close());
    // Silent once the head has sent a few KiB: the handshake and the first RPC commands pass, the weights never arrive.
    const relay = await silencingRelay(t.port, 8 * 1024);
    let alive = true;
    const offer: StageOffer = {
      nodeId: "stage-node-b",
      tunnel: `127.0.0.1:${relay.port}`,
      budget: 1 << 30,
      device: { name: "CPU", type: "cpu", free: 1 << 30, total: 1 << 30 },
      inUse: false,
    };
    const started = SplitEngine.start({
      model: "tiny",
      engine: { modelPath, nCtx: 1024, nParallel: 1, nBatch: 256, threads: 1 },
      want: { kind: "count", nodes: 2 },
      headId: "head-node",
      secret: SECRET,
      offers: () => (alive ? [offer] : []),
      maxRttMs: 10_000,
      waitMs: 0,
      logger: silentLogger,
    }).then(
      (e) => {
        closers.push(() => e.close());
        return "loaded";
      },
      (e: unknown) => (e instanceof EngineError ? e.code : String(e)),
    );
    await Bun.sleep(300);
    alive = false;
    const hung = new Promise<string>((r) => setTimeout(() => r("still loading"), 30_000).unref());
    expect(await Promise.race([started, hung])).toBe("model_load_failed");
  }, 120_000);
});
