import { describe, expect, test } from "bun:test";
import { HostLedger, hostLedgerBytes, readHostLedger } from "../../src/engine/host-ledger";

describe("host buffer ledger", () => {
  test("records_buffers_until_freed_and_reuses_freed_entries", () => {
    const buf = new SharedArrayBuffer(hostLedgerBytes(4));
    const l = new HostLedger(buf);
    expect(l.add(0x1000, 100)).toBe(true);
    expect(l.add(0x2000, 200)).toBe(true);
    l.remove(0x1000);
    expect(l.add(0x3000, 300)).toBe(true);
    const { buffers, untracked } = readHostLedger(buf);
    expect(buffers.sort((a, b) => a.ptr - b.ptr)).toEqual([
      { ptr: 0x2000, size: 200 },
      { ptr: 0x3000, size: 300 },
    ]);
    expect(untracked).toBe(0);
    // Freeing what was never recorded (or twice) changes nothing.
    l.remove(0x9000);
    l.remove(0x1000);
    expect(l.size).toBe(2);
  });

  test("past_its_capacity_a_buffer_is_counted_as_untracked_and_the_ledger_does_not_grow", () => {
    const buf = new SharedArrayBuffer(hostLedgerBytes(2));
    const l = new HostLedger(buf);
    expect(l.add(0x1000, 1)).toBe(true);
    expect(l.add(0x2000, 1)).toBe(true);
    expect(l.add(0x3000, 1)).toBe(false);
    expect(l.add(0x4000, 1)).toBe(false);
    expect(l.size).toBe(2);
    expect(readHostLedger(buf)).toEqual({
      buffers: [
        { ptr: 0x1000, size: 1 },
        { ptr: 0x2000, size: 1 },
      ],
      untracked: 2,
    });
    // A freed entry makes room again.
    l.remove(0x1000);
    expect(l.add(0x5000, 1)).toBe(true);
  });
});
