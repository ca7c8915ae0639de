// A fault-injecting HTTP forward proxy for meshes of separate processes on
// loopback. The kernel here has no netem, so faults are injected above TCP:
// every node is started with HTTP_PROXY pointing here, with its own name as
// the proxy user, so each request it sends to a peer arrives as
// `GET http://127.0.0.1:<peer port>/...` from a known sender. A request
// travels the link from -> to and its answer the link to -> from; each
// directed link can be cut, lose messages, delay them or duplicate them, and
// changes apply at once, also to answers already streaming.
//
// What a fault looks like to a node:
// - cut or lost: the message vanishes and the connection stays silent (the
//   sender's own timeout notices), as when packets stop arriving;
// - delay: a request, and an answer's headers, arrive `delayMs` late (latency,
//   not throughput: a streaming body is not slowed further);
// - duplicate: the request is sent a second time and the second answer is
//   thrown away (a retransmission that replay protection must refuse).
// Bounded: at most MAX_ACTIVE exchanges at once (past it a request is refused
// at once), every silent hold ends after MAX_HOLD_MS, and stop() ends all.

/** Faults of one directed link; anything absent is healthy. */
export interface LinkFaults {
  /** Nothing passes. */
  cut?: boolean;
  /** Chance in [0, 1] that one message (a request, or an answer's headers) is lost. */
  drop?: number;
  /** Added latency of every request and answer (headers; body chunks follow as they come). */
  delayMs?: number;
  /** Chance in [0, 1] that a request is sent twice. */
  duplicate?: number;
  /** Let this many bytes of one event stream (text/event-stream answer) through, then cut the link (a cut mid-answer). */
  cutAfterBytes?: number;
}

/** Counters of what the proxy did. */
export interface ProxyStats {
  requests: number;
  lost: number;
  held: number;
  duplicated: number;
  refused: number;
  active: number;
}

const MAX_ACTIVE = 4096;
const MAX_HOLD_MS = 120_000;
// Headers of one hop only.
const HOP = new Set(["proxy-authorization", "proxy-connection", "connection", "keep-alive", "transfer-encoding", "content-length", "te"]);

/** A proxy all nodes of one test send their peer traffic through. */
export class FaultProxy {
  private readonly links = new Map<string, LinkFaults>();
  private readonly names = new Map<string, string>();
  private readonly stopping = new AbortController();
  private readonly server: ReturnType<typeof Bun.serve>;
  readonly stats: ProxyStats = { requests: 0, lost: 0, held: 0, duplicated: 0, refused: 0, active: 0 };

  constructor(private readonly random: () => number = Math.random) {
    this.server = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      // Held exchanges are silent on purpose: the proxy never closes them for idleness.
      idleTimeout: 0,
      fetch: (req) => this.handle(req),
    });
  }

  /** The HTTP_PROXY value for node `name`: its traffic is then attributed to it. */
  proxyUrl(name: string): string {
    return `http://${encodeURIComponent(name)}:x@127.0.0.1:${this.server.port}`;
  }

  /** Environment for a node process named `name` (its peer traffic goes through this proxy). */
  env(name: string): Record<string, string> {
    const env: Record<string, string> = {};
    for (const [k, v] of Object.entries(process.env)) if (v !== undefined && !/^(no_proxy|http_proxy|https_proxy)$/i.test(k)) env[k] = v;
    env.HTTP_PROXY = this.proxyUrl(name);
    return env;
  }

  /** Name the node at `addr` ("127.0.0.1:port"), so links to it can be faulted. */
  register(addr: string, name: string): void {
    this.names.set(addr, name);
  }

  /** Set the faults of the link from -> to (replacing what it had). */
  set(from: string, to: string, faults: LinkFaults): void {
    this.links.set(`${from}>${to}`, { ...faults });
  }

  /** Set the same faults on both directions of every link between named nodes. */
  setAll(faults: LinkFaults): void {
    const all = [...new Set(this.names.values())];
    for (const a of all) for (const b of all) if (a !== b) this.set(a, b, faults);
  }

  /** Cut every link between the two groups, both ways. */
  partition(left: string[], right: string[]): void {
    for (const a of left)
      for (const b of right) {
        this.set(a, b, { cut: true });
        this.set(b, a, { cut: true });
      }
  }

  /** Heal every link. */
  heal(): void {
    this.links.clear();
  }

  /** The faults of the link from -> to now. */
  faults(from: string, to: string): LinkFaults {
    return this.links.get(`${from}>${to}`) ?? {};
  }

  /** End every exchange and stop listening. */
  async stop(): Promise<void> {
    this.stopping.abort();
    await this.server.stop(true);
  }

  private async handle(req: Request): Promise<Response> {
    this.stats.requests++;
    if (this.stats.active >= MAX_ACTIVE) {
      this.stats.refused++;
      return new Response("fault proxy: too many exchanges", { status: 502 });
    }
    this.stats.active++;
    try {
      return await this.exchange(req);
    } finally {
      this.stats.active--;
    }
  }

  private async exchange(req: Request): Promise<Response> {
    const url = new URL(req.url);
    const from = senderOf(req.headers.get("proxy-authorization"));
    const to = this.names.get(url.host) ?? url.host;
    const signal = AbortSignal.any([req.signal, this.stopping.signal]);
    const out = this.faults(from, to);
    if (this.lost(out)) return await this.hold(signal);
    if (out.delayMs) await sleep(out.delayMs, signal);
    const body = req.method === "GET" || req.method === "HEAD" ? undefined : new Uint8Array(await req.arrayBuffer());
    const headers = new Headers();
    for (const [k, v] of req.headers) if (!HOP.has(k)) headers.set(k, v);
    const init = { method: req.method, headers, body, redirect: "manual" as const, decompress: false };
    if (out.duplicate && this.random() < out.duplicate) {
      this.stats.duplicated++;
      void fetch(url, { ...init, signal: this.stopping.signal })
        .then((r) => r.body?.cancel())
        .catch(() => {});
    }
    let upstream: Response;
    try {
      upstream = await fetch(url, { ...init, signal });
    } catch {
      // The peer is down. A proxy cannot refuse a connection it already took, so the sender gets a 502 that
      // carries no mesh proof, which a node treats as a failed exchange, as it would a refused connection.
      return unreachable();
    }
    const back = this.faults(to, from);
    if (this.lost(back)) {
      await upstream.body?.cancel().catch(() => {});
      return await this.hold(signal);
    }
    if (back.delayMs) await sleep(back.delayMs, signal);
    const h = new Headers();
    for (const [k, v] of upstream.headers) if (!HOP.has(k)) h.set(k, v);
    const sse = (upstream.headers.get("content-type") ?? "").startsWith("text/event-stream");
    return new Response(this.body(upstream, to, from, signal, sse), { status: upstream.status, headers: h });
  }

  // An answer's body, chunk by chunk under the link's faults as they are at each chunk.
  private body(upstream: Response, to: string, from: string, signal: AbortSignal, sse: boolean): ReadableStream<Uint8Array> | null {
    const reader = upstream.body?.getReader();
    if (!reader) return null;
    let passed = 0;
    return new ReadableStream<Uint8Array>({
      pull: async (c) => {
        try {
          const { value, done } = await reader.read();
          const f = this.faults(to, from);
          if (done) return c.close();
          const limit = sse && f.cutAfterBytes !== undefined ? f.cutAfterBytes : Number.POSITIVE_INFINITY;
          if (!f.cut && passed + value.byteLength > limit) {
            // Exactly `limit` bytes get through, then the link is cut.
            if (limit > passed) c.enqueue(value.subarray(0, limit - passed));
            passed = limit;
            this.set(to, from, { ...f, cut: true });
          } else passed += value.byteLength;
          if (this.faults(to, from).cut) {
            // The rest never arrives: the connection goes silent until the receiver gives up.
            await reader.cancel().catch(() => {});
            this.stats.held++;
            await waitAbort(signal, MAX_HOLD_MS);
            return c.error(new Error("link cut"));
          }
          c.enqueue(value);
        } catch (e) {
          c.error(e);
        }
      },
      cancel: () => {
        reader.cancel().catch(() => {});
      },
    });
  }

  private lost(f: LinkFaults): boolean {
    const lost = f.cut === true || (f.drop !== undefined && this.random() < f.drop);
    if (lost) this.stats.lost++;
    return lost;
  }

  // A lost message: silence until the sender gives up (or the bound ends it).
  private async hold(signal: AbortSignal): Promise<Response> {
    this.stats.held++;
    await waitAbort(signal, MAX_HOLD_MS);
    return unreachable();
  }
}

function unreachable(): Response {
  return new Response("fault proxy: no answer", { status: 502, headers: { "x-fault-proxy": "unreachable" } });
}

function senderOf(auth: string | null): string {
  const m = /^Basic (.+)$/i.exec(auth ?? "");
  if (!m) return "?";
  const user = Buffer.from(m[1] as string, "base64").toString("utf8");
  return decodeURIComponent(user.slice(0, user.indexOf(":") >>> 0));
}

function waitAbort(signal: AbortSignal, ms: number): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done, { once: true });
  });
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return waitAbort(signal, ms);
}
