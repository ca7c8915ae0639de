// The cost of one routing decision (the request's key, the index lookup and
// the policy over every candidate) for an 80 000-character agent prompt,
// measured after a few prompts and again after a million distinct ones went
// through the index: the index is bounded, so the second figure must equal
// the first.
//
//   bun run src/bench/routing-decision.ts [--fill 1000000] [--samples 20000] [--workers 8] [--json]
import { parseArgs } from "node:util";
import type { WorkerInfo } from "../mesh/wire";
import { type KeyMessage, RouteKeyer, Router } from "../routing";

/** One phase's latency figures, in microseconds. */
export interface DecisionFigures {
  indexedPrompts: number;
  indexEntries: number;
  /** A prompt never seen before (every block hashed). */
  cold: Latency;
  /** A new task under a system prompt the index holds: the lookup searches for where the match ends. */
  newTask: Latency;
  /** An agent's next turn: its past was keyed before. */
  followUp: Latency;
}

/** Latency of key + decision, and of the key alone (p50), in microseconds. */
export interface Latency {
  p50Us: number;
  p99Us: number;
  maxUs: number;
  keyP50Us: number;
}

/** The whole run. */
export interface DecisionReport {
  promptChars: number;
  blocks: number;
  workers: number;
  samples: number;
  few: DecisionFigures;
  many: DecisionFigures;
  wallSeconds: number;
}

/** Options of a run. */
export interface DecisionOptions {
  fill: number;
  samples: number;
  workers: number;
  seed: number;
}

function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 2 ** 32;
  };
}

function text(r: () => number, chars: number): string {
  const words = ["alpha", "beta", "gamma", "delta", "file", "src", "const", "return", "value", "index", "{", "}", "(", ")", "\n"];
  let s = "";
  while (s.length < chars) s += `${words[Math.floor(r() * words.length)]} `;
  return s.slice(0, chars);
}

/** An agent conversation of about `chars` characters: a system prompt, then turns of user, tool call and tool result. */
export function agentPrompt(r: () => number, chars: number): KeyMessage[] {
  const msgs: KeyMessage[] = [{ role: "system", content: text(r, 6000) }];
  let n = 6000;
  for (let t = 0; n < chars; t++) {
    const user = text(r, 300);
    const result = text(r, Math.min(chars - n, 4000 + Math.floor(r() * 4000)));
    msgs.push({ role: "user", content: user });
    msgs.push({
      role: "assistant",
      content: null,
      tool_calls: [{ id: `call_${t}`, type: "function", function: { name: "read_file", arguments: `{"path":"src/f${t}.ts"}` } }],
    });
    msgs.push({ role: "tool", tool_call_id: `call_${t}`, content: result });
    n += user.length + result.length + 40;
  }
  return msgs;
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))] as number;
}

/** Run the benchmark. */
export function runDecisionBench(o: DecisionOptions): DecisionReport {
  const started = performance.now();
  const r = rng(o.seed);
  const keyer = new RouteKeyer("the routing decision benchmark's mesh secret");
  const workers: WorkerInfo[] = Array.from({ length: o.workers }, (_, i) => ({
    id: `w${i}`,
    nodeId: `n${i}`,
    addr: `10.0.0.${i}:9337`,
    models: ["m"],
    ctxSize: 32768,
    slotsTotal: 8,
    slotsBusy: i % 8,
    kvUsed: 1000 * i,
    kvCached: 4000 * i,
    kvTotal: 262144,
    queueDepth: 0,
    health: "ready",
  }));
  const router = new Router({ selfId: "n0", workers: () => workers, now: () => 0 });
  const index = router.index.model("m");
  // Through JSON, as a request body arrives: flat strings, not the ropes string building leaves.
  const probes = Array.from({ length: 16 }, () => JSON.parse(JSON.stringify(agentPrompt(r, 80_000))) as KeyMessage[]);
  // Each probe's first half is held by some worker, so every decision finds a match and weighs it.
  probes.forEach((p, i) => {
    const k = keyer.chat("m", p.slice(0, Math.ceil(p.length / 2)));
    index.insertPath(
      `n${i % o.workers}`,
      k.hashes.map((h, j) => [h, j ? (k.hashes[j - 1] as string) : null] as [string, string | null]),
    );
  });
  let unique = 0;
  const time = (pick: (i: number) => KeyMessage[]): Latency => {
    const total: number[] = [];
    const keys: number[] = [];
    for (let i = 0; i < o.samples; i++) {
      const msgs = pick(i);
      const t0 = performance.now();
      const key = keyer.chat("m", msgs);
      const t1 = performance.now();
      router.decide("m", key);
      const t2 = performance.now();
      total.push((t2 - t0) * 1000);
      keys.push((t1 - t0) * 1000);
    }
    total.sort((a, b) => a - b);
    keys.sort((a, b) => a - b);
    const us = (x: number) => Math.round(x * 10) / 10;
    return {
      p50Us: us(percentile(total, 0.5)),
      p99Us: us(percentile(total, 0.99)),
      maxUs: us(total[total.length - 1] as number),
      keyP50Us: us(percentile(keys, 0.5)),
    };
  };
  const fresh = (i: number): KeyMessage[] => {
    const p = probes[i % probes.length] as KeyMessage[];
    // Another first message changes every block's fingerprint: nothing of it was keyed before.
    const first = JSON.parse(JSON.stringify({ role: "system", content: `session ${unique++}: ${p[0]?.content as string}` }));
    return [first, ...p.slice(1)];
  };
  const task = (i: number): KeyMessage[] => {
    const p = probes[i % probes.length] as KeyMessage[];
    const second = JSON.parse(JSON.stringify({ role: "user", content: `task ${unique++}: ${p[1]?.content as string}` }));
    return [p[0] as KeyMessage, second, ...p.slice(2)];
  };
  const measure = (indexed: number): DecisionFigures => {
    for (let i = 0; i < 500; i++) router.decide("m", keyer.chat("m", fresh(i)));
    return {
      indexedPrompts: indexed,
      indexEntries: index.stats().entries,
      cold: time(fresh),
      newTask: time(task),
      followUp: time((i) => probes[i % probes.length] as KeyMessage[]),
    };
  };
  const few = measure(probes.length);
  // A million distinct prompts, each reported held by some worker: what a busy mesh puts through the index.
  for (let i = 0; i < o.fill; i++) {
    const k = keyer.completion("m", `prompt ${i} ${text(r, 200)}`);
    index.insertPath(
      `n${i % o.workers}`,
      k.hashes.map((h, j) => [h, j ? (k.hashes[j - 1] as string) : null] as [string, string | null]),
    );
  }
  const many = measure(probes.length + o.fill);
  const sample = keyer.chat("m", probes[0] as KeyMessage[]);
  return {
    promptChars: sample.chars,
    blocks: sample.hashes.length,
    workers: o.workers,
    samples: o.samples,
    few,
    many,
    wallSeconds: Math.round((performance.now() - started) / 100) / 10,
  };
}

/** The report as a table. */
export function formatDecisionReport(r: DecisionReport): string {
  const label = { cold: "new prompt", newTask: "new task, held system prompt", followUp: "next turn" };
  const row = (name: string, f: DecisionFigures, kind: "cold" | "newTask" | "followUp") => {
    const l = f[kind];
    return `| ${name} | ${label[kind]} | ${f.indexedPrompts} | ${f.indexEntries} | ${l.keyP50Us} | ${l.p50Us} | ${l.p99Us} | ${l.maxUs} |`;
  };
  return [
    `prompt: ${r.promptChars} characters, ${r.blocks} blocks; ${r.workers} workers; ${r.samples} decisions per row (${r.wallSeconds} s)`,
    "",
    "| index | request | prompts through it | entries | key p50 (us) | decision p50 (us) | p99 (us) | max (us) |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    row("few", r.few, "cold"),
    row("few", r.few, "newTask"),
    row("few", r.few, "followUp"),
    row("many", r.many, "cold"),
    row("many", r.many, "newTask"),
    row("many", r.many, "followUp"),
  ].join("\n");
}

if (import.meta.main) {
  const { values } = parseArgs({
    options: {
      fill: { type: "string", default: "1000000" },
      samples: { type: "string", default: "20000" },
      workers: { type: "string", default: "8" },
      seed: { type: "string", default: "1" },
      json: { type: "boolean", default: false },
    },
  });
  const report = runDecisionBench({
    fill: Number(values.fill),
    samples: Number(values.samples),
    workers: Number(values.workers),
    seed: Number(values.seed),
  });
  console.log(values.json ? JSON.stringify(report, null, 2) : formatDecisionReport(report));
}
