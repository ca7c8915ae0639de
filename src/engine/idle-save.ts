// When an idle conversation's KV may be copied to host RAM ahead of need,
// and when one moved out by an admission may be copied back.
//
// The copy runs on the engine Worker and cannot be interrupted, so a turn of
// that same conversation arriving meanwhile waits for it: 50-700 ms for a
// 8k-16k-token conversation on this project's bench machine (docs/benchmarks.md).
// An agent's next turn follows its tool call, often within a second, so a long
// conversation is left alone longer: the wait before its copy is ten times
// what the copy is expected to take, which keeps the copy within a tenth of
// the idle time in front of it, and short conversations go at the old 100 ms.

/** The shortest idle time before a copy (ms): a client's next turn often follows within milliseconds. */
export const IDLE_SAVE_MIN_MS = 100;

/** Copy rate the wait is planned with (bytes per ms): about 1 GiB/s, what a fresh host buffer takes in a VM. */
export const IDLE_COPY_BYTES_PER_MS = (1024 * 1024 * 1024) / 1000;

/** How many times the expected copy time a conversation is left idle before its copy. */
export const IDLE_SAVE_COPY_FACTOR = 10;

/** Milliseconds a conversation of `bytes` of KV state stays idle before its ahead-of-need copy. */
export function idleSaveDelayMs(bytes: number): number {
  if (!(bytes > 0)) return IDLE_SAVE_MIN_MS;
  return Math.max(IDLE_SAVE_MIN_MS, Math.ceil((IDLE_SAVE_COPY_FACTOR * bytes) / IDLE_COPY_BYTES_PER_MS));
}

// The copy back (idle restore) goes the other way: a conversation an admission moved to host RAM
// to make room returns to the pool once what displaced it has finished, so its next turn does not
// wait for the copy. It is planned with the same rule (a tenth of the idle time in front of it),
// at the rate a restore runs at: into the KV buffers that exist, from a buffer already written.

/** Copy-back rate the wait is planned with (bytes per ms): 6 GiB/s; 64 MiB took 9-10 ms, 128 MiB 18.5 ms on the bench machine. */
export const IDLE_RESTORE_BYTES_PER_MS = (6 * 1024 * 1024 * 1024) / 1000;

/** Milliseconds the engine stays idle before a displaced conversation of `bytes` of KV state is copied back. */
export function idleRestoreDelayMs(bytes: number): number {
  if (!(bytes > 0)) return IDLE_SAVE_MIN_MS;
  return Math.max(IDLE_SAVE_MIN_MS, Math.ceil((IDLE_SAVE_COPY_FACTOR * bytes) / IDLE_RESTORE_BYTES_PER_MS));
}
