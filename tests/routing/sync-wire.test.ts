import { describe, expect, test } from "bun:test";
import { seededRandom } from "../../src/mesh/sim";
import { hashFromBytes } from "../../src/routing/key";
import { compress, decodeSections, decompress, encodedSize, encodeSections, MAX_SECTIONS, type Section } from "../../src/routing/sync-wire";

const rnd = seededRandom(7);
function h(): string {
  const b = new Uint8Array(8);
  for (let i = 0; i < 8; i++) b[i] = Math.floor(rnd() * 256);
  return hashFromBytes(b, 0);
}
function chain(n: number, parent: string | null = null): Array<[string, string | null]> {
  const out: Array<[string, string | null]> = [];
  for (let i = 0; i < n; i++) {
    const x = h();
    out.push([x, parent]);
    parent = x;
  }
  return out;
}

const sample = (): Section[] => [
  { model: "m1", reset: true, syncing: true, evicts: [h(), h()], inserts: [...chain(5), ...chain(3), ...chain(2, h())] },
  { model: "org/m2:q4", reset: false, syncing: false, evicts: [], inserts: chain(1) },
  { model: "m3", reset: false, syncing: false, evicts: [h()], inserts: [] },
];

describe("routing sync wire format", () => {
  test("sections_round_trip_and_the_size_is_exact", () => {
    const s = sample();
    const buf = encodeSections(s);
    expect(buf.length).toBe(encodedSize(s));
    expect(decodeSections(buf)).toEqual({ ok: true, value: s });
    const z = decompress(compress(buf), buf.length);
    expect(z.ok && Buffer.from(z.value).equals(Buffer.from(buf))).toBe(true);
  });

  test("an_insert_in_a_chain_costs_its_eight_bytes", () => {
    const one: Section[] = [{ model: "m", reset: false, syncing: false, evicts: [], inserts: chain(1000) }];
    expect(encodedSize(one)).toBeLessThanOrEqual(8 * 1000 + 16);
    // An eviction is an explicit 8-byte hash, whatever its value.
    const zero = hashFromBytes(new Uint8Array(8), 0);
    const ev: Section[] = [{ model: "m", reset: false, syncing: false, evicts: [zero], inserts: [] }];
    expect(decodeSections(encodeSections(ev))).toEqual({ ok: true, value: ev });
  });

  test("every_truncated_or_corrupted_payload_is_refused_without_throwing", () => {
    const buf = encodeSections(sample());
    for (let n = 0; n < buf.length; n++) expect(decodeSections(buf.subarray(0, n)).ok).toBe(false);
    expect(decodeSections(new Uint8Array([...buf, 0])).ok).toBe(false);
    const r = seededRandom(3);
    for (let i = 0; i < 2000; i++) {
      const x = Uint8Array.from(buf);
      const k = 1 + Math.floor(r() * 4);
      for (let j = 0; j < k; j++) x[Math.floor(r() * x.length)] = Math.floor(r() * 256);
      const d = decodeSections(x);
      if (d.ok) for (const s of d.value) expect(s.inserts.length + s.evicts.length).toBeLessThanOrEqual(x.length / 8);
    }
    for (let i = 0; i < 500; i++) {
      const x = Uint8Array.from({ length: Math.floor(r() * 64) }, () => Math.floor(r() * 256));
      expect(() => decodeSections(x)).not.toThrow();
    }
  });

  test("counts_beyond_the_bytes_left_are_refused_before_allocating", () => {
    // version 1, one section "m", no flags, 2^27 evictions claimed in a 12-byte payload.
    const claim = new Uint8Array([1, 1, 1, 109, 0, 0xff, 0xff, 0xff, 0x3f, 0]);
    expect(decodeSections(claim)).toMatchObject({ ok: false, code: "malformed" });
    const twice: Section[] = [
      { model: "m", reset: false, syncing: false, evicts: [h()], inserts: [] },
      { model: "m", reset: false, syncing: false, evicts: [h()], inserts: [] },
    ];
    expect(decodeSections(encodeSections(twice))).toMatchObject({ ok: false, message: "a model appears twice" });
    const many = Array.from(
      { length: MAX_SECTIONS + 1 },
      (_, i): Section => ({ model: `m${i}`, reset: true, syncing: false, evicts: [], inserts: [] }),
    );
    expect(decodeSections(encodeSections(many))).toMatchObject({ ok: false, message: "bad section count" });
    expect(decodeSections(encodeSections(many.slice(1))).ok).toBe(true);
    const bad = encodeSections([{ model: "m", reset: false, syncing: false, evicts: [], inserts: [] }]);
    bad[4] = 0x80; // an unknown flag
    expect(decodeSections(bad).ok).toBe(false);
  });

  test("decompression_checks_the_size_header_before_decompressing", () => {
    const bomb = Buffer.alloc(32, 0x22);
    bomb.writeUInt32LE(0xffffffff, 0);
    const t0 = performance.now();
    expect(decompress(bomb, 1 << 20)).toMatchObject({ ok: false, code: "too_large" });
    expect(performance.now() - t0).toBeLessThan(50);
    const real = compress(encodeSections(sample()));
    expect(decompress(real, 16)).toMatchObject({ ok: false, code: "too_large" });
    const lie = Buffer.from(real);
    lie.writeUInt32LE(real.readUInt32LE(0) + 1, 0);
    expect(decompress(lie, 1 << 20)).toMatchObject({ ok: false, code: "malformed" });
    expect(decompress(Buffer.from([1, 0, 0, 0]), 1 << 20)).toMatchObject({ ok: false, code: "malformed" });
    expect(decompress(Buffer.from([200, 0, 0, 0, 0xff, 0xff, 0xff]), 1 << 20).ok).toBe(false);
  });
});
