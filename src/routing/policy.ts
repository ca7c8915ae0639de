// Which peer runs a request for a model this node does not serve: the least
// loaded healthy worker, by slots busy plus queue depth relative to its slots.
import type { NodeId, WorkerInfo } from "../mesh/wire";

/** What the ranking needs besides the workers. */
export interface RankOptions {
  /** This node: never a forwarding target (a forward to self would loop). */
  selfId: NodeId;
  /**
   * Requests this node has sent to a worker and not yet seen finish. Worker
   * records lag behind by a gossip round; without this every request of a
   * burst would pick the same worker that looked idle a second ago.
   */
  inflight?: (workerId: string) => number;
}

/** Load of a worker: (busy slots + queued + our unfinished forwards) per slot; 0 is idle, 1 is full, above 1 queues. */
export function workerLoad(w: WorkerInfo, inflight = 0): number {
  return (w.slotsBusy + w.queueDepth + inflight) / Math.max(1, w.slotsTotal);
}

function kvFill(w: WorkerInfo): number {
  return w.kvTotal > 0 ? w.kvUsed / w.kvTotal : 0;
}

/** Workers that can take a request for `model`, best first (e.g. `rankWorkers(all, "qwen", { selfId })[0]`). */
export function rankWorkers(workers: readonly WorkerInfo[], model: string, o: RankOptions): WorkerInfo[] {
  const inflight = o.inflight ?? (() => 0);
  return workers
    .filter((w) => w.health === "ready" && w.nodeId !== o.selfId && w.models.includes(model))
    .map((w) => ({ w, load: workerLoad(w, inflight(w.id)), kv: kvFill(w) }))
    .sort((a, b) => a.load - b.load || a.kv - b.kv || (a.w.id < b.w.id ? -1 : a.w.id > b.w.id ? 1 : 0))
    .map((x) => x.w);
}
