// Stage offers: what a node started with --offer-stage lends to split models,
// as its own signed `stage:{nodeId}` record in the replicated store (a record
// type of its own, beside the worker records). Only its owner writes it: the
// store's signatures make that hold cryptographically.
import { isCount, isObject, isStr } from "../mesh/check";

/** Key prefix of stage offers in the replicated store. */
export const STAGE_PREFIX = "stage:";
const MAX_ADDR = 300;
const MAX_NAME = 64;

/** A node's stage offer. */
export interface StageOffer {
  nodeId: string;
  /** host:port of its stage tunnel (tunnel.ts): the only way in to its RPC server. */
  tunnel: string;
  /** Bytes it lends to stages (--stage-memory, capped by what its device has free). */
  budget: number;
  /** The device ggml serves there. */
  device: { name: string; type: string; free: number; total: number };
  /** Whether a head holds its stage server now (it serves one head at a time). */
  inUse: boolean;
}

/** The store key of a node's offer. */
export function stageKey(nodeId: string): string {
  return `${STAGE_PREFIX}${nodeId}`;
}

/** Canonical JSON of an offer (fixed field order). */
export function serializeOffer(o: Omit<StageOffer, "nodeId">): string {
  return JSON.stringify({
    tunnel: o.tunnel,
    budget: o.budget,
    device: { name: o.device.name, type: o.device.type, free: o.device.free, total: o.device.total },
    inUse: o.inUse,
  });
}

/** Parse the offer `value` that `owner` wrote under `key`; null when it does not check out (another node's key included). */
export function parseOffer(key: string, owner: string, value: string): StageOffer | null {
  if (key !== stageKey(owner)) return null;
  let v: unknown;
  try {
    v = JSON.parse(value);
  } catch {
    return null;
  }
  if (!isObject(v) || !isStr(v.tunnel, MAX_ADDR) || !/^[^\s]+:\d{1,5}$/.test(v.tunnel) || !isCount(v.budget)) return null;
  // A port net.connect refuses (it throws) would break every head's planning.
  const port = Number(v.tunnel.slice(v.tunnel.lastIndexOf(":") + 1));
  if (port < 1 || port > 65535) return null;
  const d = v.device;
  if (!isObject(d) || !isStr(d.name, MAX_NAME) || !isStr(d.type, 16) || !isCount(d.free) || !isCount(d.total)) return null;
  if (typeof v.inUse !== "boolean") return null;
  return {
    nodeId: owner,
    tunnel: v.tunnel,
    budget: v.budget,
    device: { name: d.name, type: d.type, free: d.free, total: d.total },
    inUse: v.inUse,
  };
}

/** The offers among records (as the store lists them), one per owner, malformed ones skipped. */
export function offersOf(records: Iterable<{ key: string; owner: string; value: string | null }>): StageOffer[] {
  const out: StageOffer[] = [];
  for (const r of records) {
    if (r.value === null || !r.key.startsWith(STAGE_PREFIX)) continue;
    const o = parseOffer(r.key, r.owner, r.value);
    if (o) out.push(o);
  }
  return out;
}
