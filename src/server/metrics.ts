import type { EngineStats } from "../engine";
import { EVICTION_REASONS, evictionFields } from "../engine/scheduler";

// Prometheus text exposition, written here because it is small: counters,
// gauges and histograms with fixed, bounded label sets (route names and status
// codes only, never request content).

type Labels = Record<string, string>;

function key(labels: Labels): string {
  return Object.entries(labels)
    .map(([k, v]) => `${k}="${v.replace(/["\\\n]/g, "_")}"`)
    .join(",");
}

// A hard cap on label combinations per metric, so a bug can never grow memory.
const MAX_SERIES = 256;

class Counter {
  readonly values = new Map<string, number>();
  constructor(
    readonly name: string,
    readonly help: string,
  ) {}
  inc(labels: Labels = {}, by = 1): void {
    const k = key(labels);
    if (!this.values.has(k) && this.values.size >= MAX_SERIES) return;
    this.values.set(k, (this.values.get(k) ?? 0) + by);
  }
  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} counter`];
    for (const [k, v] of this.values) lines.push(`${this.name}${k ? `{${k}}` : ""} ${v}`);
    return lines.join("\n");
  }
}

class Histogram {
  private readonly counts: number[];
  private sum = 0;
  private count = 0;
  constructor(
    readonly name: string,
    readonly help: string,
    readonly buckets: number[],
  ) {
    this.counts = buckets.map(() => 0);
  }
  observe(v: number): void {
    this.sum += v;
    this.count++;
    for (let i = 0; i < this.buckets.length; i++) if (v <= (this.buckets[i] as number)) this.counts[i] = (this.counts[i] as number) + 1;
  }
  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} histogram`];
    this.buckets.forEach((b, i) => {
      lines.push(`${this.name}_bucket{le="${b}"} ${this.counts[i]}`);
    });
    lines.push(`${this.name}_bucket{le="+Inf"} ${this.count}`, `${this.name}_sum ${this.sum}`, `${this.name}_count ${this.count}`);
    return lines.join("\n");
  }
}

/** Engine figures read when /metrics is scraped, summed over the node's engines. */
export type GaugeValues = EngineStats;

/** One metric family in Prometheus text: HELP, TYPE, then a row per label set (labels as written, e.g. `{op="save"}`). */
export function family(name: string, type: "gauge" | "counter", help: string, rows: [string, number][]): string {
  return [`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`, ...rows.map(([labels, v]) => `${name}${labels} ${v}`)].join("\n");
}
const gauge = (name: string, help: string, v: number) => family(name, "gauge", help, [["", v]]);
const counter = (name: string, help: string, rows: [string, number][]) => family(name, "counter", help, rows);

/** The server's metrics. */
export class Metrics {
  readonly requests = new Counter("mesh_http_requests_total", "HTTP requests by route and status code");
  readonly promptTokens = new Counter("mesh_prompt_tokens_total", "Prompt tokens processed");
  readonly cachedTokens = new Counter("mesh_cached_prompt_tokens_total", "Prompt tokens served from the KV cache");
  readonly completionTokens = new Counter("mesh_completion_tokens_total", "Tokens generated");
  readonly ttft = new Histogram(
    "mesh_time_to_first_token_seconds",
    "Time from request to first token",
    [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
  );
  readonly tokenLatency = new Histogram(
    "mesh_time_per_output_token_seconds",
    "Mean time between output tokens, per request",
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1],
  );
  readonly queueWait = new Histogram(
    "mesh_queue_wait_seconds",
    "Time an admitted request waited for a slot and KV room",
    [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
  );
  // The engine's in-flight safety cap refuses on the main thread, before the
  // scheduler sees the request, so the engine's own counters never include it.
  private serverBusy = 0;

  /** Count a request refused by the engine's in-flight safety cap (429 server_busy). */
  rejectedServerBusy(): void {
    this.serverBusy++;
  }

  /** Prometheus text for all metrics plus the given engine figures. */
  render(g: GaugeValues | null): string {
    const parts = [
      this.requests,
      this.promptTokens,
      this.cachedTokens,
      this.completionTokens,
      this.ttft,
      this.tokenLatency,
      this.queueWait,
    ].map((m) => m.render());
    if (g) {
      parts.push(
        gauge("mesh_slots_busy", "Slots running a request", g.slotsBusy),
        gauge("mesh_slots_total", "Parallel slots", g.slotsTotal),
        gauge("mesh_requests_waiting", "Requests queued for a slot and KV room", g.waiting),
        gauge("mesh_queue_capacity", "Requests the queue holds before refusing with 429", g.queueCapacity),
        gauge("mesh_kv_cells_total", "KV cells in the pool", g.kvCellsTotal),
        [
          "# HELP mesh_kv_cells KV cells by state: held by running requests, held by idle resident prefixes, promised to running requests, free",
          "# TYPE mesh_kv_cells gauge",
          `mesh_kv_cells{state="running"} ${g.kvCellsRunning}`,
          `mesh_kv_cells{state="resident"} ${g.kvCellsResident}`,
          `mesh_kv_cells{state="reserved"} ${g.kvCellsReserved}`,
          `mesh_kv_cells{state="free"} ${g.kvCellsFree}`,
        ].join("\n"),
        counter("mesh_admissions_total", "Admission decisions: admitted, queued first (then admitted or refused), rejected", [
          ['{result="admitted"}', g.admitted],
          ['{result="queued"}', g.queued],
          ['{result="rejected"}', g.rejectedQueueFull + g.rejectedQueueTimeout + this.serverBusy],
        ]),
        counter("mesh_admission_rejections_total", "Requests refused with 429, by reason", [
          ['{reason="queue_full"}', g.rejectedQueueFull],
          ['{reason="queue_timeout"}', g.rejectedQueueTimeout],
          ['{reason="server_busy"}', this.serverBusy],
        ]),
        counter(
          "mesh_kv_evictions_total",
          "Idle resident prefixes trimmed or dropped from the KV pool, by reason: budget (room for an admission or a step), offload (moved to host RAM when another request started), divergent (the tail after a reused prefix), retry (after a refused decode)",
          EVICTION_REASONS.map((r) => [`{reason="${r}"}`, g[evictionFields(r).count]]),
        ),
        counter(
          "mesh_kv_evicted_cells_total",
          "KV cells freed by eviction, by reason",
          EVICTION_REASONS.map((r) => [`{reason="${r}"}`, g[evictionFields(r).cells]]),
        ),
        counter("mesh_decode_kv_failures_total", "Decode steps llama.cpp refused for lack of KV room (recovered or not)", [
          ["", g.decodeKvFailures],
        ]),
        counter("mesh_decode_failures_total", "Decode failures that failed requests", [["", g.decodeFailures]]),
        counter("mesh_requests_stopped_at_pool_limit_total", "Requests without max_tokens ended (length) when the pool was full", [
          ["", g.stoppedAtPoolLimit],
        ]),
        counter(
          "mesh_decode_steps_total",
          "Decode steps (one llama_decode each) by attention path: plain (a batch in the --plain-attn window, matrix-product attention) or default (the context's own, flash attention on CPU)",
          [
            ['{attention="plain"}', g.plainAttnSteps],
            ['{attention="default"}', g.decodeSteps - g.plainAttnSteps],
          ],
        ),
        counter(
          "mesh_attention_ops_total",
          "CPU flash-attention ops (one per layer per decode step) by kernel: mesh (one sequence's batch of 2 or more tokens) or ggml (the rest, and every op with --attn-kernel ggml); whole process",
          [
            ['{kernel="mesh"}', g.attnOpsMesh],
            ['{kernel="ggml"}', g.attnOpsGgml],
          ],
        ),
        counter("mesh_prefill_tokens_total", "Prompt tokens decoded (not served from cache)", [["", g.prefillTokens]]),
        gauge("mesh_host_cache_bytes", "Host RAM held by idle sequences' saved KV state", g.hostCacheBytes),
        gauge("mesh_host_cache_capacity_bytes", "Bound of the host RAM cache (--cache-ram)", g.hostCacheCapacityBytes),
        gauge("mesh_host_cache_entries", "Idle sequences saved in host RAM", g.hostCacheEntries),
        counter(
          "mesh_host_cache_operations_total",
          "Idle sequences saved to host RAM, restored into a slot for a request, copied back while the engine was idle, failed to restore, dropped to stay within the bound",
          [
            ['{op="save"}', g.hostSaves],
            ['{op="restore"}', g.hostRestores],
            ['{op="idle_restore"}', g.hostIdleRestores],
            ['{op="restore_failed"}', g.hostRestoreFailures],
            ['{op="evict"}', g.hostCacheEvictions],
          ],
        ),
        counter("mesh_host_cache_restored_tokens_total", "Prompt tokens served from state restored out of host RAM", [
          ["", g.hostRestoredTokens],
        ]),
        counter(
          "mesh_kv_compactions_total",
          "Times a reused prefix, alone in the KV pool above cells others left, was copied back from cell 0 so requests attend over fewer cells",
          [["", g.compactions]],
        ),
        counter("mesh_kv_compacted_cells_total", "KV cells copied back by compactions", [["", g.compactedCells]]),
        gauge("mesh_checkpoints", "Session KV checkpoints held (RAM and disk)", g.checkpoints),
        gauge("mesh_checkpoint_ram_bytes", "RAM held by session checkpoints (--checkpoint-ram)", g.checkpointRamBytes),
        gauge("mesh_checkpoint_disk_bytes", "Disk held by spilled session checkpoints (--checkpoint-disk)", g.checkpointDiskBytes),
        counter("mesh_checkpoint_saves_total", "Session checkpoints saved at the end of a reply", [["", g.checkpointSaves]]),
        counter("mesh_checkpoint_restores_total", "Session checkpoints restored into a slot before prefill", [["", g.checkpointRestores]]),
        counter("mesh_checkpoint_restored_tokens_total", "Prompt tokens served from restored session checkpoints", [
          ["", g.checkpointRestoredTokens],
        ]),
        counter("mesh_checkpoint_spills_total", "Session checkpoints moved from RAM to disk", [["", g.checkpointSpills]]),
        counter("mesh_checkpoint_drops_total", "Session checkpoints dropped (released, expired, or past the disk budget)", [
          ["", g.checkpointDrops],
        ]),
      );
    }
    return `${parts.join("\n")}\n`;
  }
}
