// Worker records: the deterministic worker id, and the checked, canonical
// JSON form a worker travels in (its owner's signed `worker:{id}` value).
import { createHash } from "node:crypto";
import { isCount, isList, isNodeId, isObject, isStr } from "./check";
import type { NodeId, WorkerInfo } from "./wire";

/** Key prefix of worker records in the replicated store. */
export const WORKER_PREFIX = "worker:";
/** Most names in a worker record (its model and that model's aliases), and the longest name. */
export const MAX_MODELS = 16;
export const MAX_MODEL = 256;
const MAX_ADDR = 300;
const HEALTH = new Set(["loading", "ready", "failed"]);
/** Most devices a worker record lists, and the longest device and backend names. */
export const MAX_DEVICES = 8;
const MAX_DEVICE_NAME = 64;
const MAX_BACKEND_NAME = 32;
const DEVICE_TYPES = new Set(["cpu", "gpu", "igpu", "accel"]);

/** What a node says about one of its own workers; id and nodeId are derived. */
export type LocalWorkerSpec = Omit<WorkerInfo, "id" | "nodeId">;

/** Worker id: hex of the first 16 bytes of SHA-256 over node id, primary model and address, e.g. `workerIdOf(node, "qwen", "10.0.0.2:9337")`. */
export function workerIdOf(nodeId: NodeId, model: string, addr: string): string {
  return createHash("sha256").update(`mesh/worker/v1\n${nodeId}\n${model}\n${addr}`).digest().subarray(0, 16).toString("hex");
}

/** The store key of a worker id. */
export function workerKey(id: string): string {
  return `${WORKER_PREFIX}${id}`;
}

/** Canonical JSON of a worker (fixed field order, so equal workers serialise to equal strings). */
export function serializeWorker(w: WorkerInfo): string {
  return JSON.stringify({
    id: w.id,
    nodeId: w.nodeId,
    addr: w.addr,
    models: w.models,
    ctxSize: w.ctxSize,
    slotsTotal: w.slotsTotal,
    slotsBusy: w.slotsBusy,
    kvUsed: w.kvUsed,
    kvCached: w.kvCached,
    kvTotal: w.kvTotal,
    queueDepth: w.queueDepth,
    health: w.health,
    ...(w.devices
      ? { devices: w.devices.map((d) => ({ name: d.name, backend: d.backend, type: d.type, free: d.free, total: d.total })) }
      : {}),
  });
}

/** Check a spec for a local worker; returns a message for a person when it is unusable. */
export function checkSpec(v: unknown): string | null {
  if (!isObject(v)) return "a worker must be an object";
  if (!isList(v.models, MAX_MODELS) || v.models.length === 0 || !v.models.every((m) => isStr(m, MAX_MODEL))) {
    return `models must be 1 to ${MAX_MODELS} non-empty names`;
  }
  if (!isStr(v.addr, MAX_ADDR)) return "addr must be host:port";
  for (const f of ["ctxSize", "slotsTotal", "slotsBusy", "kvUsed", "kvCached", "kvTotal", "queueDepth"] as const) {
    if (!isCount(v[f])) return `${f} must be a non-negative integer`;
  }
  if (typeof v.health !== "string" || !HEALTH.has(v.health)) return "health must be loading, ready or failed";
  if (v.devices !== undefined) {
    if (!isList(v.devices, MAX_DEVICES)) return `devices must be a list of at most ${MAX_DEVICES}`;
    for (const d of v.devices) {
      if (!isObject(d) || !isStr(d.name, MAX_DEVICE_NAME) || !isStr(d.backend, MAX_BACKEND_NAME))
        return "a device needs a name and a backend";
      if (typeof d.type !== "string" || !DEVICE_TYPES.has(d.type)) return "a device's type must be cpu, gpu, igpu or accel";
      if (!isCount(d.free) || !isCount(d.total)) return "a device's free and total memory must be non-negative integers";
    }
  }
  return null;
}

/** Parse a worker record's value owned by `owner` under `id`; null if it does not check out. */
export function parseWorker(value: string, owner: NodeId, id: string): WorkerInfo | null {
  let v: unknown;
  try {
    v = JSON.parse(value);
  } catch {
    return null;
  }
  if (checkSpec(v) !== null || !isObject(v) || !isNodeId(v.nodeId)) return null;
  const w = v as unknown as WorkerInfo;
  // The id binds the record to its owner: nobody can publish under another node's worker id.
  if (w.nodeId !== owner || w.id !== id || workerIdOf(owner, w.models[0] as string, w.addr) !== id) return null;
  return JSON.parse(serializeWorker(w)) as WorkerInfo;
}
