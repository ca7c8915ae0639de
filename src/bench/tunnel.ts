// What the stage tunnel costs on loopback, both ends in this process: bulk
// throughput (MB/s) and a 1-byte request/answer round trip, through the
// tunnel and straight to the same sink. `bun run src/bench/tunnel.ts`
import { connect, createServer } from "node:net";
import { openTunnel, serveTunnel } from "../split/tunnel";

const SECRET = "tunnel-bench-secret";
const END = 0xff;

// A sink standing in for ggml's RPC server: answers one byte whenever it sees END.
const sink = createServer((s) => {
  s.on("data", (d: Buffer) => {
    if (d.includes(END)) s.write("k");
  });
});
await new Promise<void>((r) => sink.listen(0, "127.0.0.1", () => r()));
const direct = (sink.address() as { port: number }).port;
const server = await serveTunnel({ host: "127.0.0.1", port: 0, secret: SECRET, rpcPort: direct });
const client = await openTunnel("127.0.0.1", server.port, SECRET);
const tunneled = Number(client.endpoint.split(":")[1]);

async function dial(port: number) {
  const s = connect({ host: "127.0.0.1", port, noDelay: true });
  await new Promise((r) => s.once("connect", r));
  return s;
}

async function throughput(port: number, mib: number): Promise<number> {
  const s = await dial(port);
  const chunk = Buffer.alloc(1 << 20, 1);
  const t0 = performance.now();
  const answered = new Promise((r) => s.once("data", r));
  for (let i = 0; i < mib; i++) if (!s.write(chunk)) await new Promise((r) => s.once("drain", r));
  s.write(Buffer.from([END]));
  await answered;
  s.destroy();
  return mib / ((performance.now() - t0) / 1000);
}

async function roundTrip(port: number, n: number): Promise<number> {
  const s = await dial(port);
  const t0 = performance.now();
  for (let i = 0; i < n; i++) {
    const answered = new Promise((r) => s.once("data", r));
    s.write(Buffer.from([END]));
    await answered;
  }
  s.destroy();
  return ((performance.now() - t0) / n) * 1000;
}

process.stdout.write(
  `bulk: direct ${(await throughput(direct, 256)).toFixed(0)} MiB/s, tunnel ${(await throughput(tunneled, 256)).toFixed(0)} MiB/s\n`,
);
process.stdout.write(
  `round trip: direct ${(await roundTrip(direct, 500)).toFixed(0)} us, tunnel ${(await roundTrip(tunneled, 500)).toFixed(0)} us\n`,
);
process.exit(0);
