// The head of a split model: plans the split from the mesh's stage offers,
// opens a tunnel per stage, loads the model over them (engine/ does the
// native part), and serves it as any other engine. When a stage is lost, the
// engine fails what is in flight (503 / a final SSE error event, see
// engine/index.ts) and this re-plans over the stages left, or loads the model
// whole when it fits here, and says so in the log and /metrics.
import { freemem } from "node:os";
import {
  Engine,
  EngineError,
  type EngineLike,
  type EngineOptions,
  type GenerateOptions,
  type Generation,
  type TenancyDelta,
} from "../engine/index";
import type { EngineStats, ModelInfo } from "../engine/protocol";
import { readGgufHeader } from "../gguf/read";
import { GgufValueType } from "../gguf/types";
import type { Logger } from "../log";
import type { StageOffer } from "./offer";
import { planSplit, type SplitModel, type SplitPlan, type SplitWant, splitWeights } from "./plan";
import { openTunnel, probeTunnel, type TunnelClient } from "./tunnel";

/** How long a head waits between attempts to (re-)plan while no plan works. */
export const REPLAN_EVERY_MS = 1_000;
/** How often a split head checks that the mesh still counts its stages alive. */
export const STAGE_MEMBERSHIP_EVERY_MS = 1_000;

/** What /v1/models, /metrics and `mesh peers` show of a split model. */
export interface SplitReport {
  model: string;
  /** "split": serving over stages; "solo": re-planned onto this node alone; "replanning": a stage was lost, not serving yet. */
  state: "split" | "solo" | "replanning";
  stages: Array<{ node_id: string; role: "head" | "stage"; first_layer: number; layers: number; bytes: number; rtt_ms: number | null }>;
  refused: Array<{ node_id: string; reason: string }>;
  /** Stage losses and completed re-plans since start. */
  stages_lost: number;
  replans: number;
}

/** Options of a split head. */
export interface SplitHeadOptions {
  model: string;
  engine: Omit<EngineOptions, "split">;
  want: SplitWant;
  headId: string;
  secret: string;
  /** The stage offers the mesh knows now (the head's own excluded or not: it is skipped). */
  offers: () => StageOffer[];
  maxRttMs: number;
  /** How long the first plan waits for enough offers to appear. */
  waitMs: number;
  logger: Logger;
}

/** Bytes one layer slot needs: its weights (the file's tensor bytes spread over blocks and output) and its KV for nCtx cells (f16 K and V). */
export async function splitModelOf(path: string, nCtx: number): Promise<SplitModel | null> {
  try {
    const h = await readGgufHeader(path);
    const arch = h.metadata.get("general.architecture");
    if (arch?.type !== GgufValueType.STRING) return null;
    const num = (k: string) => {
      const v = h.metadata.get(`${arch.value}.${k}`)?.value;
      return typeof v === "number" ? v : 0;
    };
    const nLayer = num("block_count");
    if (nLayer <= 0) return null;
    const nEmbd = num("embedding_length");
    const nHead = num("attention.head_count") || 1;
    const nHeadKv = num("attention.head_count_kv") || nHead;
    const { size } = Bun.file(path);
    const kv = nCtx * 2 * 2 * Math.ceil((nEmbd / nHead) * nHeadKv);
    return { nLayer, layerBytes: Math.ceil((size - h.dataOffset) / (nLayer + 1)) + kv };
  } catch {
    return null;
  }
}

/** A split model as an engine: the current inner engine (split, or whole after a re-plan), swapped when a stage is lost. */
export class SplitEngine implements EngineLike {
  private inner: Engine | null = null;
  private tunnels: TunnelClient[] = [];
  private plan: SplitPlan | null = null;
  private state: SplitReport["state"] = "replanning";
  private lost = 0;
  private replans = 0;
  private closed = false;
  private replanning: Promise<void> | null = null;
  private lastInfo: ModelInfo | null = null;
  private readonly tenancyListeners = new Set<(d: TenancyDelta) => void>();
  /** Stages of the plan just lost: their offers may still say "in use" (by this head) until gossip catches up. */
  private formerStages = new Set<string>();

  private constructor(
    private readonly o: SplitHeadOptions,
    private readonly shape: SplitModel,
  ) {}

  /** Plan (waiting up to waitMs for offers), open the tunnels and load; rejects with an EngineError when no split works. */
  static async start(o: SplitHeadOptions): Promise<SplitEngine> {
    const shape = await splitModelOf(o.engine.modelPath, o.engine.nCtx ?? 16384);
    if (!shape) throw new EngineError("model_load_failed", `cannot read the layer count of ${o.engine.modelPath} to plan a split`);
    const e = new SplitEngine(o, shape);
    const deadline = Date.now() + o.waitMs;
    for (;;) {
      const r = await e.attempt(o.want, false);
      if (r === null) return e;
      if (Date.now() >= deadline) {
        await e.dropTunnels();
        throw new EngineError("model_load_failed", `cannot split ${o.model}: ${r}`);
      }
      await Bun.sleep(REPLAN_EVERY_MS);
    }
  }

  // One try at planning and loading; null on success, else why not.
  private async attempt(want: SplitWant, soloOk: boolean): Promise<string | null> {
    const o = this.o;
    const offers = o.offers().filter((x) => x.nodeId !== o.headId && (!x.inUse || this.formerStages.has(x.nodeId)));
    const probed = await Promise.all(
      offers.map(async (x) => {
        const sep = x.tunnel.lastIndexOf(":");
        const r = await probeTunnel(x.tunnel.slice(0, sep).replace(/^\[|\]$/g, ""), Number(x.tunnel.slice(sep + 1)), o.secret, 2_000);
        return { offer: x, rttMs: "rttMs" in r ? r.rttMs : null, unreachable: "code" in r ? r.message : undefined };
      }),
    );
    const headBudgetBytes = freemem();
    const plan = planSplit({
      model: this.shape,
      headId: o.headId,
      headBudgetBytes,
      candidates: probed.map((p) => ({ nodeId: p.offer.nodeId, budgetBytes: p.offer.budget, rttMs: p.rttMs, unreachable: p.unreachable })),
      want,
      maxRttMs: o.maxRttMs,
    });
    if ("code" in plan) {
      // No stage left: serve whole when the model fits this node.
      if (soloOk && headBudgetBytes >= (this.shape.nLayer + 1) * this.shape.layerBytes) return this.load(null, []);
      return plan.message;
    }
    const tunnels: TunnelClient[] = [];
    for (const s of plan.stages.slice(1)) {
      const x = (probed.find((p) => p.offer.nodeId === s.nodeId) as { offer: StageOffer }).offer;
      const sep = x.tunnel.lastIndexOf(":");
      tunnels.push(await openTunnel(x.tunnel.slice(0, sep).replace(/^\[|\]$/g, ""), Number(x.tunnel.slice(sep + 1)), o.secret));
    }
    this.tunnels = tunnels;
    // From here, not only once loaded: a stage gone silent mid-load would hang the load for good.
    this.watchMembership(plan, tunnels);
    return this.load(plan, tunnels);
  }

  private async load(plan: SplitPlan | null, tunnels: TunnelClient[]): Promise<string | null> {
    const o = this.o;
    let engine: Engine;
    try {
      engine = await Engine.load({
        ...o.engine,
        split: plan ? { endpoints: tunnels.map((t) => t.endpoint), weights: splitWeights(plan) } : null,
      });
    } catch (e) {
      await this.dropTunnels();
      return (e as Error).message;
    }
    if (this.closed) {
      await engine.close();
      await this.dropTunnels();
      return null;
    }
    this.inner = engine;
    this.formerStages.clear();
    this.lastInfo = engine.info;
    this.plan = plan;
    this.state = plan ? "split" : "solo";
    for (const l of this.tenancyListeners) engine.onTenancy(l);
    engine.onFailure((err) => this.stageLost(engine, err.message));
    for (const t of tunnels) t.onLost((why) => this.stageLost(engine, why));
    if (plan) {
      o.logger.info("split model loaded", {
        model: o.model,
        stages: plan.stages.map((s) => `${s.nodeId.slice(0, 12)}:${s.firstLayer}+${s.layers}`).join(" "),
        refused: plan.refused.length,
      });
    } else o.logger.warn("split model re-planned onto this node alone: no stage peer left, and it fits here", { model: o.model });
    return null;
  }

  private async dropTunnels(): Promise<void> {
    const ts = this.tunnels;
    this.tunnels = [];
    await Promise.all(ts.map((t) => t.close()));
  }

  // A stage that stops answering without closing its connection (its machine lost power or the
  // network, its process was stopped) leaves ggml's RPC client waiting for good: no timeout there,
  // and no FIN here. Once the mesh's membership no longer counts it alive (its offer is gone from
  // offers()), close its tunnel: the blocked call then fails at once (a load in progress fails and
  // is tried again; a loaded engine is dropped) and the head re-plans.
  private watchMembership(plan: SplitPlan, tunnels: TunnelClient[]): void {
    const stages = plan.stages.filter((s) => s.role === "stage");
    const timer = setInterval(() => {
      // These tunnels were dropped (a loss, a failed load, close): whoever dropped them re-plans.
      if (this.tunnels !== tunnels || this.closed) {
        clearInterval(timer);
        return;
      }
      const alive = new Set(this.o.offers().map((x) => x.nodeId));
      const gone = stages.findIndex((s) => !alive.has(s.nodeId));
      if (gone < 0) return;
      clearInterval(timer);
      // Loaded over these tunnels (they are still this head's): that engine is the one lost.
      if (this.inner) this.stageLost(this.inner, `stage ${stages[gone]?.nodeId.slice(0, 12)} is no longer alive in the mesh`);
      void tunnels[gone]?.close();
    }, STAGE_MEMBERSHIP_EVERY_MS);
    timer.unref();
  }

  // A stage died or left (its tunnel closed, or the native client gave up): fail what runs, re-plan.
  private stageLost(engine: Engine, why: string): void {
    if (this.inner !== engine || this.closed) return;
    this.inner = null;
    this.state = "replanning";
    this.lost++;
    this.formerStages = new Set((this.plan?.stages ?? []).filter((s) => s.role === "stage").map((s) => s.nodeId));
    this.o.logger.warn("split model lost a stage; failing its requests and re-planning", { model: this.o.model, why });
    this.replanning = (async () => {
      // Closing first: an idle Worker's frees touch the dead stage, and that must land on the old engine's flag.
      await engine.close();
      await this.dropTunnels();
      while (!this.closed) {
        // A throw here would end the loop for good: the model would stay "replanning", every request a 503.
        const r = await this.attempt({ kind: "auto" }, true).catch((e: unknown) => `re-plan failed: ${(e as Error).message}`);
        if (r === null) {
          this.replans++;
          this.o.logger.info("split model re-planned", { model: this.o.model, state: this.state });
          return;
        }
        this.o.logger.warn("cannot re-plan the split model yet", { model: this.o.model, why: r });
        await Bun.sleep(REPLAN_EVERY_MS);
      }
    })().finally(() => {
      this.replanning = null;
    });
  }

  /** The split as it stands. */
  report(): SplitReport {
    return {
      model: this.o.model,
      state: this.state,
      stages: (this.plan?.stages ?? []).map((s) => ({
        node_id: s.nodeId,
        role: s.role,
        first_layer: s.firstLayer,
        layers: s.layers,
        bytes: s.bytes,
        rtt_ms: s.rttMs === null ? null : Math.round(s.rttMs * 100) / 100,
      })),
      refused: (this.plan?.refused ?? []).map((r) => ({ node_id: r.nodeId, reason: r.reason })),
      stages_lost: this.lost,
      replans: this.replans,
    };
  }

  private live(): Engine {
    if (!this.inner) throw new EngineError("engine_closed", "a stage of this split model was lost; re-planning");
    return this.inner;
  }

  get info(): ModelInfo {
    return (this.inner?.info ?? this.lastInfo) as ModelInfo;
  }
  tokenize(text: string, opts?: { addSpecial?: boolean; parseSpecial?: boolean }): Promise<number[]> {
    return this.live().tokenize(text, opts);
  }
  detokenize(tokens: number[], opts?: { special?: boolean }): Promise<string> {
    return this.live().detokenize(tokens, opts);
  }
  pieces(tokens: number[]): Promise<Uint8Array[]> {
    return this.live().pieces(tokens);
  }
  stats(): Promise<EngineStats> {
    return this.live().stats();
  }
  generate(opts: GenerateOptions): Generation {
    return this.live().generate(opts);
  }
  cancel(id: number): void {
    this.inner?.cancel(id);
  }
  get inFlight(): number {
    return this.inner?.inFlight ?? 0;
  }
  async close(): Promise<void> {
    this.closed = true;
    const e = this.inner;
    this.inner = null;
    await e?.close();
    await this.dropTunnels();
  }
  addMarks(id: number, marks: Array<[string, string | null]>): void {
    this.inner?.addMarks(id, marks);
  }
  clearMarks(): void {
    this.inner?.clearMarks();
  }
  onTenancy(listener: (delta: TenancyDelta) => void): () => void {
    this.tenancyListeners.add(listener);
    const off = this.inner?.onTenancy(listener);
    return () => {
      this.tenancyListeners.delete(listener);
      off?.();
    };
  }
  releaseCheckpoints(keys: string[]): void {
    this.inner?.releaseCheckpoints(keys);
  }
  /** Settles once a re-plan in progress ends (tests). */
  whenSettled(): Promise<void> {
    return this.replanning ?? Promise.resolve();
  }
}
