// The stage tunnel: the only way to reach a node's ggml RPC server, which
// listens on loopback and has no authentication of its own (and a history of
// memory-safety bugs). A stage node listens here; a head opens a loopback port
// per stage that llama.cpp's RPC client connects to, and pipes it through.
//
// Handshake (before a single RPC byte is read or forwarded):
//   server -> client  sNonce (32 random bytes)
//   client -> server  mode (1 byte: 0 probe, 1 session) | cNonce (32) | HMAC(kAuth, "c" | mode | sNonce | cNonce)
//   server -> client  status (1 byte: 0 ok, 1 busy) | HMAC(kAuth, "s" | status | sNonce | cNonce)
// A wrong proof, a slow client (HANDSHAKE_TIMEOUT_MS) or a malformed message
// closes the socket; only a verified session opens the loopback RPC
// connection. Both sides prove the secret, so a head never sends weights to an
// impostor. After that, each direction is AES-256-GCM frames
// (u32 length | ciphertext | 16-byte tag) under a key derived from both
// nonces, IV = direction's frame counter: a replayed, reordered or altered
// frame fails authentication and ends the session. A head also sends an empty
// frame every HEARTBEAT_MS; a stage ends a session silent for SESSION_IDLE_MS
// (a head whose machine vanished sends no FIN), so it is free for other heads.
import { createCipheriv, createDecipheriv, createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { connect, createServer, type Server, type Socket } from "node:net";

/** How long a peer has to complete the handshake before it is cut off. */
export const HANDSHAKE_TIMEOUT_MS = 5_000;
/** Largest plaintext in one frame; a longer announced frame ends the session (bounded buffering). */
export const MAX_FRAME = 256 * 1024;
/** A head sends an empty frame this often, so its stage can tell a live head from a vanished one. */
export const HEARTBEAT_MS = 5_000;
/** A stage ends a session after this long without a frame from its head (a machine gone without a FIN). */
export const SESSION_IDLE_MS = 30_000;
/** Most connections a stage lets sit in the handshake at once; more are closed at once (each holds a socket up to HANDSHAKE_TIMEOUT_MS). */
export const MAX_PENDING_HANDSHAKES = 64;
/** At most one "refused" log line per this long: anyone who reaches the port can fail handshakes at will. */
export const REFUSAL_LOG_EVERY_MS = 10_000;
const NONCE = 32;
const MAC = 32;
const TAG = 16;

/** Keys of the stage tunnel, derived from the mesh secret under their own labels. */
export interface TunnelKeys {
  auth: Buffer;
  enc: Buffer;
}

/** Derive the tunnel's keys from the mesh secret (never the same keys as /mesh requests use). */
export function tunnelKeys(secret: string): TunnelKeys {
  const k = (label: string) => createHmac("sha256", secret).update(label).digest();
  return { auth: k("mesh-stage-tunnel-auth-v1"), enc: k("mesh-stage-tunnel-enc-v1") };
}

const mac = (key: Buffer, ...parts: Buffer[]) => {
  const h = createHmac("sha256", key);
  for (const p of parts) h.update(p);
  return h.digest();
};

function sessionKeys(k: TunnelKeys, sNonce: Buffer, cNonce: Buffer): { c2s: Buffer; s2c: Buffer } {
  return { c2s: mac(k.enc, Buffer.from("c2s"), sNonce, cNonce), s2c: mac(k.enc, Buffer.from("s2c"), sNonce, cNonce) };
}

/** Seals plaintext chunks into frames for one direction. */
class Sealer {
  private counter = 0n;
  constructor(private readonly key: Buffer) {}

  /** One frame with no plaintext: a heartbeat (the receiving end forwards nothing). */
  heartbeat(): Buffer {
    const iv = Buffer.alloc(12);
    iv.writeBigUInt64BE(this.counter++, 4);
    const c = createCipheriv("aes-256-gcm", this.key, iv);
    const body = c.final();
    const head = Buffer.alloc(4);
    head.writeUInt32BE(body.length + TAG);
    return Buffer.concat([head, body, c.getAuthTag()]);
  }

  seal(plain: Buffer): Buffer[] {
    const out: Buffer[] = [];
    for (let at = 0; at < plain.length; at += MAX_FRAME) {
      const chunk = plain.subarray(at, Math.min(plain.length, at + MAX_FRAME));
      const iv = Buffer.alloc(12);
      iv.writeBigUInt64BE(this.counter++, 4);
      const c = createCipheriv("aes-256-gcm", this.key, iv);
      const body = Buffer.concat([c.update(chunk), c.final()]);
      const head = Buffer.alloc(4);
      head.writeUInt32BE(body.length + TAG);
      out.push(head, body, c.getAuthTag());
    }
    // One write per chunk read: with Nagle off, separate writes would be separate packets.
    return [Buffer.concat(out)];
  }
}

/** Opens frames of one direction; throws on a bad frame (the session then ends). */
class Opener {
  private counter = 0n;
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  constructor(private readonly key: Buffer) {}

  open(data: Buffer): Buffer[] {
    this.pending.push(data);
    this.pendingBytes += data.length;
    const out: Buffer[] = [];
    for (;;) {
      if (this.pendingBytes < 4) break;
      let buf = this.pending.length === 1 ? (this.pending[0] as Buffer) : Buffer.concat(this.pending);
      this.pending = [buf];
      const len = buf.readUInt32BE(0);
      if (len < TAG || len > MAX_FRAME + TAG) throw new Error("frame length out of bounds");
      if (buf.length < 4 + len) break;
      const body = buf.subarray(4, 4 + len - TAG);
      const tag = buf.subarray(4 + len - TAG, 4 + len);
      const iv = Buffer.alloc(12);
      iv.writeBigUInt64BE(this.counter++, 4);
      const d = createDecipheriv("aes-256-gcm", this.key, iv);
      d.setAuthTag(tag);
      out.push(Buffer.concat([d.update(body), d.final()]));
      buf = buf.subarray(4 + len);
      this.pending = buf.length > 0 ? [buf] : [];
      this.pendingBytes = buf.length;
    }
    return out;
  }
}

/** Reads exactly n bytes of a socket's start (handshake messages); rejects on close, error or timeout. */
function readExactly(sock: Socket, n: number, timeoutMs: number): Promise<{ head: Buffer; rest: Buffer }> {
  return new Promise((resolve, reject) => {
    let got: Buffer[] = [];
    let size = 0;
    const done = (err: Error | null, value?: { head: Buffer; rest: Buffer }) => {
      clearTimeout(timer);
      sock.off("data", onData);
      sock.off("close", onClose);
      sock.off("error", onClose);
      if (err) reject(err);
      else resolve(value as { head: Buffer; rest: Buffer });
    };
    const onData = (d: Buffer) => {
      got.push(d);
      size += d.length;
      if (size >= n) {
        sock.pause();
        const all = Buffer.concat(got);
        got = [];
        done(null, { head: all.subarray(0, n), rest: all.subarray(n) });
      }
    };
    const onClose = () => done(new Error("connection closed during the handshake"));
    const timer = setTimeout(() => done(new Error("handshake timed out")), timeoutMs);
    sock.on("data", onData);
    sock.on("close", onClose);
    sock.on("error", onClose);
    sock.resume();
  });
}

// Pipe plain <-> sealed with backpressure both ways; either side closing ends both. With
// heartbeatMs, an empty frame goes out that often; with idleMs, the session ends when no frame
// came in that long (while the sealed side was not paused by backpressure).
function pipeSealed(
  plain: Socket,
  sealed: Socket,
  send: Sealer,
  recv: Opener,
  firstSealed: Buffer,
  onEnd: () => void,
  timing: { heartbeatMs?: number; idleMs?: number } = {},
): void {
  let ended = false;
  const timers: Array<ReturnType<typeof setInterval>> = [];
  const end = () => {
    if (ended) return;
    ended = true;
    for (const t of timers) clearInterval(t);
    plain.destroy();
    sealed.destroy();
    onEnd();
  };
  const fromSealed = (d: Buffer) => {
    let parts: Buffer[];
    try {
      parts = recv.open(d);
    } catch {
      end();
      return;
    }
    heard = performance.now();
    for (const p of parts) if (p.length > 0 && !plain.write(p)) sealed.pause();
  };
  let heard = performance.now();
  plain.on("drain", () => sealed.resume());
  sealed.on("drain", () => plain.resume());
  plain.on("data", (d: Buffer) => {
    let full = false;
    for (const f of send.seal(d)) full = !sealed.write(f) || full;
    if (full) plain.pause();
  });
  sealed.on("data", fromSealed);
  for (const s of [plain, sealed]) {
    s.on("close", end);
    s.on("error", end);
    s.on("end", end);
  }
  // A side closed while the handshake ran (the head closed its tunnel, say) already fired its
  // "close": without this the other side would stay open, and a stage busy, for good.
  if (plain.destroyed || sealed.destroyed) {
    end();
    return;
  }
  if (timing.heartbeatMs) timers.push(setInterval(() => sealed.write(send.heartbeat()), timing.heartbeatMs));
  if (timing.idleMs) {
    const idleMs = timing.idleMs;
    timers.push(
      setInterval(
        () => {
          if (sealed.isPaused()) heard = performance.now();
          else if (performance.now() - heard > idleMs) end();
        },
        Math.max(10, idleMs / 4),
      ),
    );
  }
  for (const t of timers) t.unref();
  if (firstSealed.length > 0) fromSealed(firstSealed);
  plain.resume();
  sealed.resume();
}

/** What a stage node's tunnel listener reports (counts for /metrics and tests). */
export interface TunnelServerStats {
  accepted: number;
  refused: number;
  busy: number;
  probes: number;
  active: number;
}

/** A stage node's tunnel listener. */
export interface TunnelServer {
  readonly port: number;
  readonly stats: TunnelServerStats;
  close(): Promise<void>;
}

/**
 * Listen on host:port (0: any free port) for heads; a verified session is
 * piped to the ggml RPC server on 127.0.0.1:rpcPort. One session at a time:
 * ggml's server serves one client, so a second head is told "busy" at once
 * rather than left waiting.
 */
export function serveTunnel(opts: {
  host: string;
  port: number;
  secret: string;
  rpcPort: number;
  /** End a session after this long without a frame from its head (default SESSION_IDLE_MS). */
  idleMs?: number;
  log?: (event: string, f: Record<string, unknown>) => void;
  /** Called with the number of active sessions (0 or 1) whenever it changes. */
  onSessions?: (active: number) => void;
}): Promise<TunnelServer> {
  const keys = tunnelKeys(opts.secret);
  const stats: TunnelServerStats = { accepted: 0, refused: 0, busy: 0, probes: 0, active: 0 };
  const log = opts.log ?? (() => {});
  let lastRefusalLog = Number.NEGATIVE_INFINITY;
  let unlogged = 0;
  const logRefusal = (remote: string) => {
    const now = performance.now();
    if (now - lastRefusalLog < REFUSAL_LOG_EVERY_MS) {
      unlogged++;
      return;
    }
    log("stage_tunnel_refused", { remote, ...(unlogged > 0 ? { also_refused_since_last_line: unlogged } : {}) });
    lastRefusalLog = now;
    unlogged = 0;
  };
  const open = new Set<Socket>();
  const track = (s: Socket) => {
    open.add(s);
    s.on("close", () => open.delete(s));
  };
  let pending = 0;
  const server: Server = createServer({ pauseOnConnect: true, noDelay: true }, (sock) => {
    // Unauthenticated connections that never answer cost a socket each until the timeout: bounded.
    if (pending >= MAX_PENDING_HANDSHAKES) {
      stats.refused++;
      sock.destroy();
      return;
    }
    pending++;
    track(sock);
    void (async () => {
      const sNonce = randomBytes(NONCE);
      sock.write(sNonce);
      let hello: { head: Buffer; rest: Buffer };
      try {
        hello = await readExactly(sock, 1 + NONCE + MAC, HANDSHAKE_TIMEOUT_MS);
      } catch {
        stats.refused++;
        sock.destroy();
        return;
      } finally {
        pending--;
      }
      const mode = hello.head.subarray(0, 1);
      const cNonce = hello.head.subarray(1, 1 + NONCE);
      const proof = hello.head.subarray(1 + NONCE);
      const want = mac(keys.auth, Buffer.from("c"), mode, sNonce, cNonce);
      if ((mode[0] !== 0 && mode[0] !== 1) || !timingSafeEqual(proof, want)) {
        stats.refused++;
        logRefusal(sock.remoteAddress ?? "");
        sock.destroy();
        return;
      }
      const status = Buffer.from([mode[0] === 1 && stats.active > 0 ? 1 : 0]);
      sock.write(Buffer.concat([status, mac(keys.auth, Buffer.from("s"), status, sNonce, cNonce)]));
      if (mode[0] === 0 || status[0] === 1) {
        if (mode[0] === 0) stats.probes++;
        else stats.busy++;
        sock.end();
        return;
      }
      stats.active++;
      stats.accepted++;
      opts.onSessions?.(stats.active);
      log("stage_session_started", { remote: sock.remoteAddress ?? "" });
      const rpc = connect({ host: "127.0.0.1", port: opts.rpcPort, noDelay: true });
      track(rpc);
      rpc.pause();
      let piped = false;
      rpc.once("connect", () => {
        piped = true;
        const k = sessionKeys(keys, sNonce, cNonce);
        pipeSealed(
          rpc,
          sock,
          new Sealer(k.s2c),
          new Opener(k.c2s),
          hello.rest,
          () => {
            stats.active--;
            opts.onSessions?.(stats.active);
            log("stage_session_ended", {});
          },
          { idleMs: opts.idleMs ?? SESSION_IDLE_MS },
        );
      });
      rpc.once("error", () => {
        if (piped) return; // the pipe ends the session itself
        stats.active--;
        opts.onSessions?.(stats.active);
        sock.destroy();
      });
    })();
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(opts.port, opts.host, () => {
      const addr = server.address();
      const port = typeof addr === "object" && addr ? addr.port : opts.port;
      resolve({
        port,
        stats,
        // Sessions end with the listener: a head holding this stage sees its tunnel close.
        close: () =>
          new Promise<void>((r) => {
            for (const s of open) s.destroy();
            server.close(() => r());
          }),
      });
    });
  });
}

/** Why a tunnel connection failed, as a value. */
export interface TunnelError {
  code: "stage_unreachable" | "stage_auth_failed" | "stage_busy";
  message: string;
}

// Connect and run the client half of the handshake; resolves the socket (paused) with any bytes after it.
async function handshake(
  host: string,
  port: number,
  keys: TunnelKeys,
  mode: 0 | 1,
  timeoutMs: number,
): Promise<{ sock: Socket; sNonce: Buffer; cNonce: Buffer; rest: Buffer; rttMs: number } | TunnelError> {
  // Every decode step is a few small request/answer messages: Nagle's delay would stall each.
  let sock: Socket;
  try {
    sock = connect({ host, port, noDelay: true });
  } catch (e) {
    // An address net.connect refuses outright (a port out of range): a value, like any unreachable stage.
    return { code: "stage_unreachable", message: `stage tunnel ${host}:${port}: ${(e as Error).message}` };
  }
  sock.pause();
  const t0 = performance.now();
  let first: { head: Buffer; rest: Buffer };
  try {
    first = await readExactly(sock, NONCE, timeoutMs);
  } catch (e) {
    sock.destroy();
    return { code: "stage_unreachable", message: `stage tunnel ${host}:${port}: ${(e as Error).message}` };
  }
  const sNonce = first.head;
  const cNonce = randomBytes(NONCE);
  const m = Buffer.from([mode]);
  const t1 = performance.now();
  sock.write(Buffer.concat([m, cNonce, mac(keys.auth, Buffer.from("c"), m, sNonce, cNonce)]));
  let reply: { head: Buffer; rest: Buffer };
  try {
    reply = await readExactly(sock, 1 + MAC, timeoutMs);
  } catch {
    sock.destroy();
    return { code: "stage_auth_failed", message: `stage tunnel ${host}:${port} refused the mesh secret` };
  }
  const rttMs = Math.min(t1 - t0, performance.now() - t1);
  const status = reply.head.subarray(0, 1);
  if (!timingSafeEqual(reply.head.subarray(1), mac(keys.auth, Buffer.from("s"), status, sNonce, cNonce))) {
    sock.destroy();
    return { code: "stage_auth_failed", message: `stage tunnel ${host}:${port} could not prove the mesh secret` };
  }
  if (status[0] === 1) {
    sock.destroy();
    return { code: "stage_busy", message: `stage ${host}:${port} already serves another head` };
  }
  return { sock, sNonce, cNonce, rest: reply.rest, rttMs };
}

/** Handshake round trip to a stage tunnel (a probe: the RPC server is not touched), or why it failed. */
export async function probeTunnel(
  host: string,
  port: number,
  secret: string,
  timeoutMs = HANDSHAKE_TIMEOUT_MS,
): Promise<{ rttMs: number } | TunnelError> {
  const r = await handshake(host, port, tunnelKeys(secret), 0, timeoutMs);
  if ("code" in r) return r;
  r.sock.destroy();
  return { rttMs: r.rttMs };
}

/** A head's local end of one stage's tunnel. */
export interface TunnelClient {
  /** "127.0.0.1:port" for llama.cpp's RPC client. */
  readonly endpoint: string;
  /** Called once when a session through it ends (the stage died, left or closed it). */
  onLost(listener: (why: string) => void): void;
  close(): Promise<void>;
}

/**
 * Open a loopback port whose connections are piped, sealed, to the stage
 * tunnel at host:port. Connections that fail the handshake are closed (the
 * RPC client then reports the stage lost).
 */
export function openTunnel(host: string, port: number, secret: string, heartbeatMs = HEARTBEAT_MS): Promise<TunnelClient> {
  const keys = tunnelKeys(secret);
  const listeners: Array<(why: string) => void> = [];
  const lost = (why: string) => {
    for (const l of listeners.splice(0)) l(why);
  };
  const socks = new Set<Socket>();
  let sessions = 0;
  const server = createServer({ pauseOnConnect: true, noDelay: true }, (local) => {
    socks.add(local);
    local.on("close", () => socks.delete(local));
    void handshake(host, port, keys, 1, HANDSHAKE_TIMEOUT_MS).then((r) => {
      if ("code" in r) {
        local.destroy();
        // Another local connection (a port scan, say) told "busy" while a session runs here is
        // no news about the stage: only a failure with no session left means it is lost.
        if (sessions === 0) lost(r.message);
        return;
      }
      sessions++;
      socks.add(r.sock);
      r.sock.on("close", () => socks.delete(r.sock));
      const k = sessionKeys(keys, r.sNonce, r.cNonce);
      pipeSealed(
        local,
        r.sock,
        new Sealer(k.c2s),
        new Opener(k.s2c),
        r.rest,
        () => {
          sessions--;
          lost(`stage ${host}:${port} closed the tunnel`);
        },
        { heartbeatMs },
      );
    });
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const addr = server.address();
      const p = typeof addr === "object" && addr ? addr.port : 0;
      resolve({
        endpoint: `127.0.0.1:${p}`,
        onLost: (l) => listeners.push(l),
        close: () =>
          new Promise<void>((r) => {
            for (const s of socks) s.destroy();
            server.close(() => r());
          }),
      });
    });
  });
}
