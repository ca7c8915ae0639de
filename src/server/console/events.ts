// Server-sent events for the console and scripts (GET /api/events). The number
// of subscribers is capped, and each has a bounded backlog: a subscriber that
// stops reading is dropped once its backlog is full, never buffered without
// bound (a browser tab in the background must not grow the node's memory).

/** Bounds of the hub. */
export interface HubLimits {
  /** Subscribers at once; one more is refused. */
  maxSubscribers: number;
  /** Events queued for one subscriber that has not read them; one more drops it. */
  maxBacklog: number;
}

/** Defaults: a few operators' tabs and scripts, a few seconds of events each. */
export const HUB_DEFAULTS: HubLimits = { maxSubscribers: 32, maxBacklog: 256 };

/** Counters of the hub. */
export interface HubStats {
  subscribers: number;
  published: number;
  /** Subscribers dropped for not reading. */
  dropped: number;
  /** Subscriptions refused at the cap. */
  refused: number;
}

interface Sub {
  controller: ReadableStreamDefaultController<Uint8Array>;
  closed: boolean;
}

const enc = new TextEncoder();

/** Fan-out of named events to bounded SSE subscribers. */
export class EventHub {
  private readonly subs = new Set<Sub>();
  private readonly limits: HubLimits;
  private readonly counts = { published: 0, dropped: 0, refused: 0 };
  /** Called when the first subscriber arrives or the last leaves (the snapshot timer runs only while someone watches). */
  onActive: (active: boolean) => void = () => {};

  constructor(limits: Partial<HubLimits> = {}) {
    this.limits = { ...HUB_DEFAULTS, ...limits };
  }

  /** Subscribers now. */
  get size(): number {
    return this.subs.size;
  }

  /** A new SSE stream starting with `first` events; null at the subscriber cap. */
  subscribe(first: Array<[string, unknown]> = []): ReadableStream<Uint8Array> | null {
    if (this.subs.size >= this.limits.maxSubscribers) {
      this.counts.refused++;
      return null;
    }
    let sub: Sub | null = null;
    const stream = new ReadableStream<Uint8Array>(
      {
        start: (controller) => {
          sub = { controller, closed: false };
          this.subs.add(sub);
          if (this.subs.size === 1) this.onActive(true);
          controller.enqueue(enc.encode(": mesh console events\n\n"));
          for (const [name, data] of first) controller.enqueue(frame(name, data));
        },
        cancel: () => {
          if (sub) this.remove(sub);
        },
      },
      // The backlog counts events; past it desiredSize goes negative and the subscriber is dropped.
      new CountQueuingStrategy({ highWaterMark: this.limits.maxBacklog }),
    );
    return stream;
  }

  /** Send event `name` with JSON `data` to every subscriber; drops those whose backlog is full. */
  publish(name: string, data: unknown): void {
    if (this.subs.size === 0) return;
    this.counts.published++;
    const bytes = frame(name, data);
    for (const s of [...this.subs]) {
      if ((s.controller.desiredSize ?? 0) <= 0) {
        this.counts.dropped++;
        this.remove(s);
        try {
          s.controller.error(new Error("subscriber too slow: dropped"));
        } catch {
          // already closed
        }
        continue;
      }
      s.controller.enqueue(bytes);
    }
  }

  /** End every subscription (shutdown). */
  close(): void {
    for (const s of [...this.subs]) {
      this.remove(s);
      try {
        s.controller.close();
      } catch {
        // already closed
      }
    }
  }

  /** Counters. */
  stats(): HubStats {
    return { subscribers: this.subs.size, ...this.counts };
  }

  private remove(s: Sub): void {
    if (s.closed) return;
    s.closed = true;
    this.subs.delete(s);
    if (this.subs.size === 0) this.onActive(false);
  }
}

function frame(name: string, data: unknown): Uint8Array {
  return enc.encode(`event: ${name}\ndata: ${JSON.stringify(data)}\n\n`);
}
