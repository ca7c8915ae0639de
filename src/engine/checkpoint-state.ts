// Moving a sequence's llama.cpp state between a slot and the checkpoint store.
// Engine Worker only (it calls the shim).
import { type Pointer, ptr, toArrayBuffer } from "bun:ffi";
import type { Checkpoint, CheckpointStore } from "./checkpoints";
import type { HostEntry } from "./host-cache";
import type { Native } from "./native";

/** The shape the scheduler restores from (a host-RAM entry's state), plus the bytes it points into, kept alive with it. */
interface RestorableState {
  ptr: Pointer;
  bytes: number;
  written: number;
  tokens: number;
  /** The buffer `ptr` points into: referenced here so it outlives the restore. */
  data: Uint8Array;
}

/** Copy sequence `seq`'s state (holding `history`) into the store under `key`; the entry, or null when it could not be saved or kept. */
export function saveCheckpoint(
  native: Native,
  ctx: Pointer,
  seq: number,
  history: readonly number[],
  key: string,
  store: CheckpointStore,
): Checkpoint | null {
  if (history.length === 0) return null;
  const sizes = new BigUint64Array(2);
  const p = native.mesh_state_seq_save(ctx, seq, sizes) as Pointer | null;
  const written = Number(sizes[0]);
  const allocated = Number(sizes[1]);
  if (!p) return null;
  try {
    if (written <= 0) return null;
    // A copy in JS memory: the store owns it (and may write it to disk) without tracking native buffers.
    const state = new Uint8Array(toArrayBuffer(p, 0, written)).slice();
    return store.put(key, history, state);
  } finally {
    native.mesh_host_free(p, allocated);
  }
}

/** A checkpoint's tokens and state as an entry the scheduler's restore path takes (never added to the host cache, never freed by it). */
export function toRestorable(tokens: Int32Array, state: Uint8Array, clock: number): HostEntry<RestorableState> {
  return {
    tokens,
    state: { ptr: ptr(state), bytes: state.length, written: state.length, tokens: tokens.length, data: state },
    lastUsed: clock,
  };
}
