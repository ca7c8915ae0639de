// The bounded buffer of membership updates that ride on probes and acks.
// Each update is sent a limited number of times (about lambda * log n), the
// least-sent first, so news spreads epidemically without a broadcast.
import type { MemberState } from "./member";

/** What the buffer needs to know of an update: whom it is about and how much it says. */
export interface Gossip {
  id: string;
  inc: number;
  state: MemberState;
}

interface Entry<U> {
  update: U;
  sent: number;
}

/** Updates waiting to be gossiped, at most one per member, at most `max` in all. */
export class Piggyback<U extends Gossip> {
  private readonly entries = new Map<string, Entry<U>>();
  /** Updates pushed out because the buffer was full. */
  dropped = 0;

  constructor(private readonly max: number) {}

  /** Queue `u` for gossip, replacing an older update about the same member. */
  add(u: U): void {
    this.entries.delete(u.id);
    if (this.entries.size >= this.max) {
      // The most-sent update has done most of its work already: it goes first.
      let worst: string | undefined;
      let most = -1;
      for (const [id, e] of this.entries) {
        if (e.sent > most) {
          most = e.sent;
          worst = id;
        }
      }
      if (worst !== undefined) this.entries.delete(worst);
      this.dropped++;
    }
    this.entries.set(u.id, { update: u, sent: 0 });
  }

  /** Someone sent us `u` and we knew it already: the news is spreading without us, count it as a send. */
  heard(u: Gossip): void {
    const e = this.entries.get(u.id);
    if (e && e.update.inc === u.inc && e.update.state === u.state) e.sent++;
  }

  /** Up to `count` least-sent updates for one message; each is dropped after `limit` sends. */
  take(count: number, limit: number): U[] {
    for (const [id, e] of this.entries) if (e.sent >= limit) this.entries.delete(id);
    if (count <= 0 || this.entries.size === 0) return [];
    const picked = [...this.entries.values()].sort((a, b) => a.sent - b.sent).slice(0, count);
    for (const e of picked) {
      e.sent++;
      if (e.sent >= limit) this.entries.delete(e.update.id);
    }
    return picked.map((e) => e.update);
  }

  /** How many updates are queued. */
  get size(): number {
    return this.entries.size;
  }
}
