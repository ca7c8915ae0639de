// The admission queue's refusal rule, as pure arithmetic: which waiting
// requests get 429 this step. The scheduler owns the queue and applies it.

/** Waiting requests to refuse, as indices into the FIFO queue (oldest first). */
export interface QueueRefusals {
  /** Waited longer than the timeout: queue_timeout. */
  timedOut: number[];
  /** Still within the timeout but beyond capacity, the newest ones: queue_full. */
  overflow: number[];
}

/**
 * Decide refusals after admission ran: a request that has waited more than
 * timeoutMs is refused, then the newest of the rest beyond capacity are, so
 * the oldest keep their place (a capacity of 0 refuses whatever could not
 * start at once).
 */
export function queueRefusals(enqueuedAt: readonly number[], now: number, capacity: number, timeoutMs: number): QueueRefusals {
  const timedOut: number[] = [];
  const kept: number[] = [];
  enqueuedAt.forEach((t, i) => {
    if (now - t > timeoutMs) timedOut.push(i);
    else kept.push(i);
  });
  return { timedOut, overflow: kept.slice(Math.max(0, capacity)) };
}
