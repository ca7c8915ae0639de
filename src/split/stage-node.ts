// The offering side of split models (`mesh serve --offer-stage`): ggml's RPC
// server on loopback, the stage tunnel in front of it, and this node's
// `stage:{id}` offer in the replicated store, kept current (in use or free).
import { freemem, totalmem } from "node:os";
import type { Logger } from "../log";
import { type StageOffer, serializeOffer, stageKey } from "./offer";
import { pruneCache } from "./stage-cache";
import { startStageServer } from "./stage-server";
import { serveTunnel, type TunnelServer } from "./tunnel";

const MiB = 1024 * 1024;
/** How often the stage cache is trimmed to its budget. */
export const CACHE_PRUNE_EVERY_MS = 60_000;
/** Default budget of the stage cache (--stage-cache), MiB. */
export const STAGE_CACHE_DEFAULT_MIB = 16 * 1024;

/** Where an offer is published: the node's replicated store (only its own keys). */
export interface OfferStore {
  put(key: string, value: string): { ok: boolean; message?: string };
}

/** A node's running stage offer. */
export interface StageNode {
  readonly offer: StageOffer;
  readonly tunnel: TunnelServer;
  /** Publish the offer again (after a restart of the store's sync, say). */
  publish(): void;
  /** Stop taking heads and end the session of the one served now (ggml's server itself lives as long as the process). */
  close(): Promise<void>;
}

/** Why the offer could not start, as a value. */
export interface StageNodeError {
  code: "stage_offer_failed";
  message: string;
}

/**
 * Start offering this node's device to split models: the RPC server, the tunnel
 * on listenHost:port (0: any), and the offer naming advertiseHost:tunnelPort.
 * The budget is --stage-memory (MiB), capped by the memory free now.
 */
export async function offerStage(o: {
  nodeId: string;
  store: OfferStore;
  secret: string;
  listenHost: string;
  advertiseHost: string;
  port: number;
  stageMemoryMiB: number | null;
  threads: number;
  /** Where received tensors are cached, and the most it may hold (0 MiB: no cache). */
  cacheDir: string;
  cacheMiB: number;
  logger: Logger;
}): Promise<StageNode | StageNodeError> {
  const cacheDir = o.cacheMiB > 0 ? o.cacheDir : null;
  let pruner: ReturnType<typeof setInterval> | null = null;
  if (cacheDir) {
    // ggml writes the cache and never trims it: keep it within the budget from here.
    const prune = () => {
      const r = pruneCache(cacheDir, o.cacheMiB * MiB);
      if (r.files > 0) o.logger.info("stage cache pruned", { files: r.files, mib: Math.round(r.bytes / MiB) });
    };
    prune();
    pruner = setInterval(prune, CACHE_PRUNE_EVERY_MS);
    pruner.unref();
  }
  const server = await startStageServer({ cacheDir, threads: o.threads });
  if ("code" in server) return { code: "stage_offer_failed", message: server.message };
  const free = freemem();
  const budget = o.stageMemoryMiB === null ? free : Math.min(free, o.stageMemoryMiB * MiB);
  const offer: StageOffer = {
    nodeId: o.nodeId,
    tunnel: "",
    budget,
    device: { name: "CPU", type: "cpu", free, total: totalmem() },
    inUse: false,
  };
  const publish = () => {
    const r = o.store.put(stageKey(o.nodeId), serializeOffer(offer));
    if (!r.ok) o.logger.warn("cannot publish the stage offer", { error: r.message });
  };
  let tunnel: TunnelServer;
  try {
    tunnel = await serveTunnel({
      host: o.listenHost,
      port: o.port,
      secret: o.secret,
      rpcPort: server.port,
      log: (event, f) => o.logger.info(event, f),
      onSessions: (active) => {
        offer.inUse = active > 0;
        publish();
      },
    });
  } catch (e) {
    return { code: "stage_offer_failed", message: `cannot listen for stage tunnels on ${o.listenHost}:${o.port}: ${(e as Error).message}` };
  }
  offer.tunnel = `${o.advertiseHost.includes(":") && !o.advertiseHost.startsWith("[") ? `[${o.advertiseHost}]` : o.advertiseHost}:${tunnel.port}`;
  publish();
  o.logger.info("offering stages", { tunnel: offer.tunnel, budget_mib: Math.round(budget / MiB), rpc: `127.0.0.1:${server.port}` });
  return {
    offer,
    tunnel,
    publish,
    close: async () => {
      if (pruner) clearInterval(pruner);
      await tunnel.close();
    },
  };
}
