// A byte-rate cap shared by every upload of a node (`--upload-limit`): each
// caller reserves its bytes on one timeline and waits until its turn, so N
// parallel uploads together stay under the rate, whatever N is.

/** Parse a rate such as "500k", "20M", "1G" or "1048576" (bytes per second, binary units); null if malformed. */
export function parseRate(v: string): number | null {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:i?[bB])?(?:\/s)?\s*$/.exec(v);
  if (!m) return null;
  const unit = { "": 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3 }[(m[2] ?? "").toLowerCase()] ?? 1;
  const n = Math.round(Number(m[1]) * unit);
  return Number.isSafeInteger(n) ? n : null;
}

/** Human form of a byte count, e.g. "1.5 GiB". */
export function formatBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u]}`;
}

/** A shared rate limit; 0 bytes per second means none. */
export class RateLimiter {
  private next = 0;

  constructor(
    readonly bytesPerSec: number,
    // A burst this long may go at once (reserved time runs at most this far ahead before anyone waits).
    private readonly burstMs = 50,
    private readonly now: () => number = () => performance.now(),
  ) {}

  /** Reserve `bytes` on the shared timeline: milliseconds to wait before sending them (0: at once). */
  reserve(bytes: number): number {
    if (this.bytesPerSec <= 0) return 0;
    const now = this.now();
    this.next = Math.max(this.next, now - this.burstMs) + (bytes * 1000) / this.bytesPerSec;
    return Math.max(0, this.next - now - this.burstMs);
  }

  /** Wait until `bytes` more may be sent. */
  async take(bytes: number): Promise<void> {
    const wait = this.reserve(bytes);
    if (wait > 0) await Bun.sleep(wait);
  }
}
