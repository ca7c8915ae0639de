import { afterEach, describe, expect, test } from "bun:test";
import { randomBytes } from "node:crypto";
import { connect, createServer, type Server, type Socket } from "node:net";
import {
  MAX_PENDING_HANDSHAKES,
  openTunnel,
  probeTunnel,
  REFUSAL_LOG_EVERY_MS,
  serveTunnel,
  type TunnelClient,
  type TunnelServer,
} from "../../src/split/tunnel";

const SECRET = "test-mesh-secret";
const cleanup: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
});

// A stand-in for ggml's RPC server on loopback: counts connections and bytes, echoes what it gets.
async function fakeRpc(): Promise<{ port: number; connections: number; bytes: number }> {
  const state = { port: 0, connections: 0, bytes: 0 };
  const socks = new Set<Socket>();
  const server: Server = createServer((s) => {
    state.connections++;
    socks.add(s);
    s.on("data", (d: Buffer) => {
      state.bytes += d.length;
      s.write(d);
    });
    s.on("error", () => {});
    s.on("close", () => socks.delete(s));
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  state.port = (server.address() as { port: number }).port;
  cleanup.push(() => {
    for (const s of socks) s.destroy();
    return new Promise<void>((r) => server.close(() => r()));
  });
  return state;
}

async function tunnelServer(rpcPort: number, secret = SECRET): Promise<TunnelServer> {
  const t = await serveTunnel({ host: "127.0.0.1", port: 0, secret, rpcPort });
  cleanup.push(() => t.close());
  return t;
}

async function tunnelClient(port: number, secret = SECRET): Promise<TunnelClient> {
  const c = await openTunnel("127.0.0.1", port, secret);
  cleanup.push(() => c.close());
  return c;
}

function dial(endpoint: string): Promise<Socket> {
  const [host, port] = endpoint.split(":");
  return new Promise((resolve, reject) => {
    const s = connect({ host: host as string, port: Number(port) }, () => resolve(s));
    s.once("error", reject);
  });
}

// Everything the socket receives until it closes (or `want` bytes arrived).
function readAll(s: Socket, want = Number.POSITIVE_INFINITY): Promise<Buffer> {
  return new Promise((resolve) => {
    const parts: Buffer[] = [];
    let n = 0;
    const done = () => resolve(Buffer.concat(parts));
    s.on("data", (d: Buffer) => {
      parts.push(d);
      n += d.length;
      if (n >= want) done();
    });
    s.on("close", done);
    s.on("error", done);
  });
}

describe("stage tunnel", () => {
  test("refuses_an_unauthenticated_connection_before_a_byte_reaches_the_rpc_server", async () => {
    const rpc = await fakeRpc();
    const t = await tunnelServer(rpc.port);
    // A raw client speaking ggml RPC straight away (HELLO is command 14), as an attacker would.
    const s = await dial(`127.0.0.1:${t.port}`);
    const got = readAll(s);
    const hello = Buffer.alloc(1 + 8);
    hello[0] = 14;
    s.write(Buffer.concat([hello, randomBytes(200)]));
    const reply = await got;
    expect(reply.length).toBe(32); // the challenge, then the socket is closed
    expect(s.destroyed || s.readableEnded).toBe(true);
    expect(t.stats.refused).toBe(1);
    expect(rpc.connections).toBe(0);
    expect(rpc.bytes).toBe(0);
  });

  test("a_flood_of_failed_handshakes_logs_one_line_not_one_per_connection", async () => {
    const rpc = await fakeRpc();
    const lines: Array<Record<string, unknown>> = [];
    const t = await serveTunnel({
      host: "127.0.0.1",
      port: 0,
      secret: SECRET,
      rpcPort: rpc.port,
      log: (event, f) => {
        if (event === "stage_tunnel_refused") lines.push(f);
      },
    });
    cleanup.push(() => t.close());
    const tries = 20;
    const t0 = performance.now();
    for (let i = 0; i < tries; i++) {
      // A well-formed hello with a wrong proof: the stage reads it whole, then refuses it.
      const s = await dial(`127.0.0.1:${t.port}`);
      const got = readAll(s);
      s.write(Buffer.concat([Buffer.from([1]), randomBytes(32 + 32)]));
      await got;
    }
    const windows = 1 + Math.ceil((performance.now() - t0) / REFUSAL_LOG_EVERY_MS);
    expect(t.stats.refused).toBe(tries);
    // One line per REFUSAL_LOG_EVERY_MS window however slow the machine, and the later ones say how many went unlogged.
    expect(lines.length).toBeGreaterThanOrEqual(1);
    expect(lines.length).toBeLessThanOrEqual(Math.min(windows, tries - 1));
    expect(rpc.connections).toBe(0);
  });

  test("refuses_a_head_with_the_wrong_secret_and_reports_the_stage_lost", async () => {
    const rpc = await fakeRpc();
    const t = await tunnelServer(rpc.port);
    const c = await tunnelClient(t.port, "another-mesh");
    const lost = new Promise<string>((r) => c.onLost(r));
    const s = await dial(c.endpoint);
    s.write("GET / HTTP/1.0\r\n\r\n");
    expect(await lost).toContain("refused the mesh secret");
    expect(t.stats.refused).toBe(1);
    expect(rpc.connections).toBe(0);
    expect(rpc.bytes).toBe(0);
  });

  test("pipes_an_authenticated_session_both_ways_encrypted_on_the_wire", async () => {
    const rpc = await fakeRpc();
    const t = await tunnelServer(rpc.port);
    // A recording relay between head and stage: what an observer of the network sees.
    const wire: Buffer[] = [];
    const relay = createServer((inner) => {
      const outer = connect({ host: "127.0.0.1", port: t.port });
      inner.on("data", (d: Buffer) => {
        wire.push(d);
        outer.write(d);
      });
      outer.on("data", (d: Buffer) => {
        wire.push(d);
        inner.write(d);
      });
      inner.on("close", () => outer.destroy());
      outer.on("close", () => inner.destroy());
      inner.on("error", () => {});
      outer.on("error", () => {});
    });
    await new Promise<void>((r) => relay.listen(0, "127.0.0.1", () => r()));
    cleanup.push(() => new Promise<void>((r) => relay.close(() => r())));
    const c = await tunnelClient((relay.address() as { port: number }).port);
    const s = await dial(c.endpoint);
    const marker = Buffer.from("PLAINTEXT-MARKER-".repeat(4));
    const payload = Buffer.concat([marker, randomBytes(3 * 1024 * 1024), marker]);
    const echoed = readAll(s, payload.length);
    s.write(payload);
    expect((await echoed).equals(payload)).toBe(true);
    expect(rpc.bytes).toBe(payload.length);
    expect(Buffer.concat(wire).includes(marker)).toBe(false);
    expect(t.stats.accepted).toBe(1);
    s.destroy();
  });

  test("tells_a_second_head_the_stage_is_busy_instead_of_queueing_it", async () => {
    const rpc = await fakeRpc();
    const t = await tunnelServer(rpc.port);
    const first = await tunnelClient(t.port);
    const a = await dial(first.endpoint);
    const echoed = readAll(a, 3);
    a.write("abc");
    await echoed;
    const second = await tunnelClient(t.port);
    const lost = new Promise<string>((r) => second.onLost(r));
    const b = await dial(second.endpoint);
    b.write("x");
    expect(await lost).toContain("already serves another head");
    expect(rpc.connections).toBe(1);
    a.destroy();
  });

  test("probes_the_round_trip_without_touching_the_rpc_server", async () => {
    const rpc = await fakeRpc();
    const t = await tunnelServer(rpc.port);
    const r = await probeTunnel("127.0.0.1", t.port, SECRET);
    expect("rttMs" in r && r.rttMs >= 0).toBe(true);
    expect(await probeTunnel("127.0.0.1", t.port, "wrong")).toMatchObject({ code: "stage_auth_failed" });
    expect(rpc.connections).toBe(0);
    expect(t.stats.probes).toBe(1);
  });

  test("ends_both_sides_when_the_stage_side_goes_away", async () => {
    const rpc = await fakeRpc();
    const t = await tunnelServer(rpc.port);
    const c = await tunnelClient(t.port);
    const lost = new Promise<string>((r) => c.onLost(r));
    const s = await dial(c.endpoint);
    const closed = readAll(s);
    s.write("hello");
    await Bun.sleep(50);
    await cleanup.shift()?.(); // the fake RPC server goes away with its sockets
    expect(await lost).toContain("closed the tunnel");
    await closed;
    expect(s.destroyed || s.readableEnded).toBe(true);
  });
  test("ends_the_stage_session_when_the_head_closes_its_tunnel_during_the_handshake", async () => {
    const rpc = await fakeRpc();
    const t = await tunnelServer(rpc.port);
    // A relay that holds the stage's handshake answer (what follows its 32-byte challenge) until released.
    let release: () => void = () => {};
    const released = new Promise<void>((r) => {
      release = r;
    });
    const sides = new Set<Socket>();
    const relay = createServer((inner) => {
      const outer = connect({ host: "127.0.0.1", port: t.port });
      sides.add(inner).add(outer);
      let seen = 0;
      inner.on("data", (d: Buffer) => outer.write(d));
      outer.on("data", (d: Buffer) => {
        const head = d.subarray(0, Math.max(0, 32 - seen));
        const tail = d.subarray(head.length);
        seen += d.length;
        if (head.length > 0) inner.write(head);
        if (tail.length > 0) void released.then(() => inner.write(tail));
      });
      inner.on("close", () => outer.destroy());
      outer.on("close", () => inner.destroy());
      inner.on("error", () => {});
      outer.on("error", () => {});
    });
    await new Promise<void>((r) => relay.listen(0, "127.0.0.1", () => r()));
    cleanup.push(() => {
      for (const s of sides) s.destroy();
      return new Promise<void>((r) => relay.close(() => r()));
    });
    const c = await openTunnel("127.0.0.1", (relay.address() as { port: number }).port, SECRET);
    const s = await dial(c.endpoint);
    s.on("error", () => {});
    // The stage has verified the head and holds a session for it; the head has not read the answer yet.
    while (t.stats.active === 0) await Bun.sleep(5);
    await c.close();
    release();
    // The head is gone: its stage must not stay "in use" (busy to every other head) for good.
    for (let i = 0; i < 100 && t.stats.active > 0; i++) await Bun.sleep(10);
    expect(t.stats.active).toBe(0);
    expect("rttMs" in (await probeTunnel("127.0.0.1", t.port, SECRET))).toBe(true);
    const other = await tunnelClient(t.port);
    const b = await dial(other.endpoint);
    const echoed = readAll(b, 2);
    b.write("ok");
    expect((await echoed).toString()).toBe("ok");
    b.destroy();
  });
  test("frees_the_stage_when_its_head_vanishes_without_closing_but_keeps_an_idle_live_head", async () => {
    const rpc = await fakeRpc();
    const t = await serveTunnel({ host: "127.0.0.1", port: 0, secret: SECRET, rpcPort: rpc.port, idleMs: 400 });
    cleanup.push(() => t.close());
    // A relay that can go silent, as a head's machine that lost power or its network: no FIN ever comes.
    let silent = false;
    const sides = new Set<Socket>();
    const relay = createServer((inner) => {
      const outer = connect({ host: "127.0.0.1", port: t.port });
      sides.add(inner).add(outer);
      inner.on("data", (d: Buffer) => silent || outer.write(d));
      outer.on("data", (d: Buffer) => silent || inner.write(d));
      inner.on("error", () => {});
      outer.on("error", () => {});
    });
    await new Promise<void>((r) => relay.listen(0, "127.0.0.1", () => r()));
    cleanup.push(() => {
      for (const s of sides) s.destroy();
      return new Promise<void>((r) => relay.close(() => r()));
    });
    // A live head that stays idle well past the stage's idle bound keeps its session: its heartbeats count.
    const live = await openTunnel("127.0.0.1", t.port, SECRET, 50);
    cleanup.push(() => live.close());
    const a = await dial(live.endpoint);
    const first = readAll(a, 2);
    a.write("hi");
    expect((await first).toString()).toBe("hi");
    await Bun.sleep(1_200);
    expect(t.stats.active).toBe(1);
    const again = readAll(a, 5);
    a.write("again");
    expect((await again).toString()).toBe("again");
    a.destroy();
    for (let i = 0; i < 100 && t.stats.active > 0; i++) await Bun.sleep(10);

    // A head behind the relay goes silent: the stage ends its session instead of staying busy for good.
    const gone = await openTunnel("127.0.0.1", (relay.address() as { port: number }).port, SECRET, 50);
    cleanup.push(() => gone.close());
    const b = await dial(gone.endpoint);
    const echoed = readAll(b, 2);
    b.write("yo");
    expect((await echoed).toString()).toBe("yo");
    expect(t.stats.active).toBe(1);
    silent = true;
    for (let i = 0; i < 300 && t.stats.active > 0; i++) await Bun.sleep(10);
    expect(t.stats.active).toBe(0);
    expect(rpc.connections).toBe(2);
    b.destroy();
  });
  test("keeps_a_live_session_when_another_local_connection_to_the_head_port_is_refused_busy", async () => {
    const rpc = await fakeRpc();
    const t = await tunnelServer(rpc.port);
    const c = await tunnelClient(t.port);
    let lostWhy: string | null = null;
    c.onLost((why) => {
      lostWhy = why;
    });
    const a = await dial(c.endpoint);
    const first = readAll(a, 3);
    a.write("abc");
    expect((await first).toString()).toBe("abc");
    // Any other local process (a port scan, a health check) connecting to the head's loopback port
    // while the RPC client holds the session: the stage answers busy and that connection is closed...
    const stray = await dial(c.endpoint);
    stray.on("error", () => {});
    await readAll(stray);
    expect(t.stats.busy).toBe(1);
    // ...but the stage is not lost: the session in use goes on, and nobody is told otherwise.
    const again = readAll(a, 3);
    a.write("def");
    expect((await again).toString()).toBe("def");
    expect(lostWhy).toBeNull();
    a.destroy();
  });

  test("closes_connections_past_the_pending_handshake_bound_and_serves_heads_once_they_go", async () => {
    const rpc = await fakeRpc();
    const t = await tunnelServer(rpc.port);
    // Silent unauthenticated connections, each holding its challenge: up to the bound they wait for the timeout.
    const idle: Socket[] = [];
    for (let i = 0; i < MAX_PENDING_HANDSHAKES; i++) {
      const s = await dial(`127.0.0.1:${t.port}`);
      s.on("error", () => {});
      await readAll(s, 32);
      idle.push(s);
    }
    // One more is closed at once, before any challenge.
    const extra = await dial(`127.0.0.1:${t.port}`);
    extra.on("error", () => {});
    expect((await readAll(extra)).length).toBe(0);
    expect(t.stats.refused).toBe(1);
    expect(idle.every((s) => !s.destroyed)).toBe(true);
    // Once they are gone, a head gets in again.
    for (const s of idle) s.destroy();
    for (let i = 0; i < 100 && t.stats.refused < 1 + MAX_PENDING_HANDSHAKES; i++) await Bun.sleep(10);
    expect("rttMs" in (await probeTunnel("127.0.0.1", t.port, SECRET))).toBe(true);
    expect(rpc.connections).toBe(0);
  });
});
