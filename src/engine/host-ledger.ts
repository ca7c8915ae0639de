import type { Pointer } from "bun:ffi";
import type { Native } from "./native";

// Host-RAM buffers the engine Worker holds (saved KV states of the host tier), recorded in
// memory shared with the main thread. A Worker that dies takes its JS heap with it, but not
// these native mappings: the reaper that frees a dead Worker's model and context reads the
// ledger to free them too. Fixed capacity: a buffer past it still works, it is only not
// recoverable after a crash (counted, so the loss is visible).

/** Entries the ledger can hold; the host tier keeps far fewer states than this in practice. */
export const HOST_LEDGER_SLOTS = 8192;

/** Bytes of the SharedArrayBuffer a ledger of `slots` entries needs (address and size per entry, one counter). */
export function hostLedgerBytes(slots = HOST_LEDGER_SLOTS): number {
  return (2 * slots + 1) * 8;
}

/** One recorded buffer: its address and the size it was allocated with. */
export interface HostBuffer {
  ptr: number;
  size: number;
}

/** The Worker's side: records buffers as they are allocated and freed (single writer). */
export class HostLedger {
  private readonly cells: BigInt64Array;
  private readonly slots: number;
  private readonly slotOf = new Map<number, number>();
  private readonly free: number[] = [];

  constructor(buf: SharedArrayBuffer) {
    this.cells = new BigInt64Array(buf);
    this.slots = Math.floor((this.cells.length - 1) / 2);
    for (let i = this.slots - 1; i >= 0; i--) this.free.push(i);
  }

  /** Record a buffer; false when the ledger is full (the buffer is then not recoverable after a crash). */
  add(ptr: number, size: number): boolean {
    if (ptr === 0 || this.slotOf.has(ptr)) return true;
    const i = this.free.pop();
    if (i === undefined) {
      Atomics.add(this.cells, 2 * this.slots, 1n);
      return false;
    }
    this.slotOf.set(ptr, i);
    Atomics.store(this.cells, 2 * i + 1, BigInt(size));
    Atomics.store(this.cells, 2 * i, BigInt(ptr));
    return true;
  }

  /** Forget a buffer that was freed. */
  remove(ptr: number): void {
    const i = this.slotOf.get(ptr);
    if (i === undefined) return;
    this.slotOf.delete(ptr);
    Atomics.store(this.cells, 2 * i, 0n);
    Atomics.store(this.cells, 2 * i + 1, 0n);
    this.free.push(i);
  }

  /** Buffers recorded now. */
  get size(): number {
    return this.slotOf.size;
  }
}

/** The reaper's side: every buffer still recorded, and how many were never recorded (the ledger was full). */
export function readHostLedger(buf: SharedArrayBuffer): { buffers: HostBuffer[]; untracked: number } {
  const cells = new BigInt64Array(buf);
  const slots = Math.floor((cells.length - 1) / 2);
  const buffers: HostBuffer[] = [];
  for (let i = 0; i < slots; i++) {
    const ptr = Number(Atomics.load(cells, 2 * i));
    if (ptr !== 0) buffers.push({ ptr, size: Number(Atomics.load(cells, 2 * i + 1)) });
  }
  return { buffers, untracked: Number(Atomics.load(cells, 2 * slots)) };
}

/** `n` with host-buffer allocation and free recorded in `ledger` (what the scheduler and checkpoints call). */
export function trackHostBuffers(n: Native, ledger: HostLedger): Native {
  return {
    ...n,
    mesh_state_seq_save: (ctx: Pointer, seq: number, out: BigUint64Array) => {
      const p = n.mesh_state_seq_save(ctx, seq, out);
      if (p) ledger.add(Number(p), Number(out[1]));
      return p;
    },
    mesh_host_free: (p: Pointer, size: number | bigint) => {
      ledger.remove(Number(p));
      n.mesh_host_free(p, size);
    },
  } as Native;
}
