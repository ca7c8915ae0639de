// The mesh half of `mesh serve`: credentials and identity before anything
// starts (so bad flags fail fast), then, once the server listens, the core at
// the advertised address, the invite line of a new mesh, and the join.

import { existsSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Logger } from "../log";
import { loadOrCreateIdentity } from "../mesh/identity";
import { credentialsFor, encodeInvite, isAddr, type MeshCredentials, resolveCredentials } from "../mesh/invite";
import { MeshNode } from "../server/mesh-node";
import { isLoopbackAddr } from "./invite";
import { advertiseAddr, type MeshFlags, type MeshPlan, planMesh } from "./mesh-flags";
import { readNodeRecord, writeNodeRecord } from "./node-client";
import { UsageError } from "./usage";

/** The mesh side of a node, ready to start once the server listens. */
export interface PreparedMesh {
  plan: MeshPlan;
  creds: MeshCredentials;
  created: boolean;
  node: MeshNode;
  /** This node's id (its key's), which local commands name as the node they mean to reach. */
  nodeId: string;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** Check the flags and load (or create) credentials and node key; throws UsageError. */
export function prepareMesh(
  f: MeshFlags & { host: string },
  o: { logger: Logger; apiKeyRequired: boolean; maxBodyBytes: number },
): PreparedMesh {
  const plan = planMesh(f);
  advertiseAddr(plan.advertise, f.host, 1); // refuses an unusable address before the model loads
  const running = readNodeRecord(plan.stateDir);
  if (running && running.pid !== process.pid && pidAlive(running.pid)) {
    throw new UsageError(
      `another mesh serve (pid ${running.pid}, ${running.url}) uses the state dir ${plan.stateDir}: give each node its own --state-dir`,
    );
  }
  const r = resolveCredentials(plan.stateDir, plan.secret === null ? null : credentialsFor(plan.secret));
  if (!r.ok) throw new UsageError(r.message);
  const id = loadOrCreateIdentity(plan.stateDir);
  if (!id.ok) throw new UsageError(id.message);
  const node = new MeshNode({
    identity: id.value,
    creds: r.value.creds,
    name: plan.nodeName,
    logger: o.logger,
    apiKeyRequired: o.apiKeyRequired,
    maxBodyBytes: o.maxBodyBytes,
    routing: plan.routing,
  });
  return { plan, creds: r.value.creds, created: r.value.created, node, nodeId: id.value.id };
}

/** Start the core at the advertised address and join; returns that address. */
export async function startMesh(p: PreparedMesh, host: string, port: number, url: string, logger: Logger): Promise<string> {
  const addr = advertiseAddr(p.plan.advertise, host, port);
  p.node.start(addr);
  writeNodeRecord(p.plan.stateDir, { url, addr, pid: process.pid, id: p.nodeId });
  if (p.created) {
    const token = encodeInvite({ ...p.creds, addrs: [addr] });
    process.stderr.write(`new mesh ${p.creds.meshId}; to add a machine, run there:\n  mesh serve --join ${token}\n`);
    if (isLoopbackAddr(addr)) {
      process.stderr.write(
        `(${addr} is reachable from this machine only: for other machines, serve with --host 0.0.0.0 or --advertise <host:port>)\n`,
      );
    }
  } else {
    process.stderr.write(`mesh ${p.creds.meshId} as ${p.plan.nodeName} at ${addr} ('mesh invite' prints the token to join it)\n`);
  }
  // Without --join, the members seen last time: a restarted node finds its mesh again by itself.
  const seeds = p.plan.seeds.length > 0 ? p.plan.seeds : rememberedPeers(p.plan.stateDir);
  rememberPeersEvery(p, addr);
  if (seeds.length > 0) {
    const joined = await p.node.join(seeds);
    if (joined.ok) logger.info("joined the mesh", { mesh: p.creds.meshId, seeds_reached: joined.value.reached });
    else logger.warn("could not join yet; retrying in the background", { mesh: p.creds.meshId, error: joined.message });
  }
  return addr;
}

const PEERS_FILE = "peers.json";
const MAX_REMEMBERED = 16;
const REMEMBER_EVERY_MS = 5_000;

/** Addresses of members this node saw alive when it last ran (at most 16). */
export function rememberedPeers(stateDir: string): string[] {
  const file = join(stateDir, PEERS_FILE);
  if (!existsSync(file)) return [];
  try {
    const v = JSON.parse(readFileSync(file, "utf8")) as unknown;
    return Array.isArray(v) ? v.filter((a): a is string => typeof a === "string" && isAddr(a)).slice(0, MAX_REMEMBERED) : [];
  } catch {
    return [];
  }
}

function rememberPeersEvery(p: PreparedMesh, self: string): void {
  const file = join(p.plan.stateDir, PEERS_FILE);
  let last = "";
  const save = () => {
    const addrs = (p.node.meshCore?.members() ?? []).filter((m) => !m.self && m.state === "alive" && m.addr !== self).map((m) => m.addr);
    if (addrs.length === 0) return; // alone for now: keep what may lead back to the mesh
    const text = JSON.stringify(addrs.slice(0, MAX_REMEMBERED));
    if (text === last) return;
    last = text;
    try {
      writeFileSync(`${file}.tmp`, text, { mode: 0o600 });
      renameSync(`${file}.tmp`, file);
    } catch {
      // Best effort: a read-only state dir only costs the automatic rejoin.
    }
  };
  const timer = setInterval(save, REMEMBER_EVERY_MS);
  timer.unref();
  p.node.onLeave(() => {
    save();
    clearInterval(timer);
  });
}
