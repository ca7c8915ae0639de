// A model this node serves: its engine (once loaded), chat template and status.
// The server starts listening before the model is loaded, so /health and
// /v1/models can say "loading" instead of refusing connections.
import { basename } from "node:path";
import { Engine, type EngineLike, type EngineOptions, type ModelInfo } from "../engine";
import { MAX_MODEL, MAX_MODELS } from "../mesh/worker-info";
import { ChatTemplate } from "./chat";

export type ModelStatus = "loading" | "ready" | "failed";

/** One locally served model. */
export class ServedModel {
  status: ModelStatus = "loading";
  engine: EngineLike | null = null;
  template: ChatTemplate | null = null;
  error: string | null = null;
  /** Settles when loading ends, either way. */
  readonly ready: Promise<void>;

  private constructor(
    readonly id: string,
    readonly path: string,
    engine: Promise<EngineLike> | EngineLike,
    /** Other names requests may use for this model (checked with checkAliases). */
    readonly aliases: readonly string[],
  ) {
    if (!(engine instanceof Promise)) {
      this.attach(engine);
      this.ready = Promise.resolve();
      return;
    }
    this.ready = engine.then(
      (e) => this.attach(e),
      (e: Error) => {
        this.status = "failed";
        this.error = e.message;
      },
    );
  }

  /** Start loading a model; returns at once. */
  static start(opts: EngineOptions & { id?: string; aliases?: readonly string[] }): ServedModel {
    return new ServedModel(opts.id ?? modelIdFromPath(opts.modelPath), opts.modelPath, Engine.load(opts), opts.aliases ?? []);
  }

  /** Serve the engine `engine` resolves to (a split model's head, which plans once the mesh is up); returns at once. */
  static loading(id: string, path: string, engine: Promise<EngineLike>, aliases: readonly string[] = []): ServedModel {
    return new ServedModel(id, path, engine, aliases);
  }

  /** Serve an engine that is already running (a FakeEngine in tests); ready at once. */
  static fromEngine(id: string, engine: EngineLike, aliases: readonly string[] = []): ServedModel {
    return new ServedModel(id, engine.info.path, engine, aliases);
  }

  /** Whether a request naming `name` (the id or an alias) is for this model. */
  answersTo(name: string): boolean {
    return name === this.id || this.aliases.includes(name);
  }

  private templateDate: string | null = null;

  /**
   * A template that prints today's date renders every prompt differently from midnight on: the
   * prefixes the engine holds are no longer what requests need, so it stops claiming them.
   */
  noteTemplateDate(): void {
    if (!this.template?.stability.dateDependent || !this.engine) return;
    const day = this.template.dateKey();
    if (this.templateDate !== null && this.templateDate !== day) this.engine.clearMarks();
    this.templateDate = day;
  }

  /** Model facts, once loaded. */
  get info(): ModelInfo | null {
    return this.engine?.info ?? null;
  }

  /** Free the engine. */
  async close(): Promise<void> {
    await this.ready;
    await this.engine?.close();
  }

  private attach(engine: EngineLike): void {
    this.engine = engine;
    // A Worker that crashed or was force-terminated serves nothing more: the node reports the model failed
    // (its worker record and /v1/models say so) instead of routing requests to a dead engine.
    engine.onFailure?.((e) => {
      this.status = "failed";
      this.error = e.message;
    });
    // A template that does not compile falls back to ours rather than making the model unusable.
    // So is one our renderer cannot run even for a plain user turn (it would fail every request).
    const tokens = { bosToken: engine.info.bosText, eosToken: engine.info.eosText };
    try {
      this.template = new ChatTemplate(engine.info.chatTemplate, tokens);
      if (!this.template.caps.renders) this.template = new ChatTemplate(null, tokens);
    } catch {
      this.template = new ChatTemplate(null, tokens);
    }
    this.status = "ready";
  }
}

/** The id a model file is served under: its file name without .gguf. */
export function modelIdFromPath(path: string): string {
  return basename(path).replace(/\.gguf$/i, "");
}

/**
 * Why a list of aliases for the models `ids` cannot be served, or null when it can: every alias
 * non-empty, at most MAX_MODEL characters, given once, not the id of a served model, and few enough
 * for a worker record to carry with its model.
 */
export function checkAliases(aliases: readonly string[], ids: readonly string[]): string | null {
  const seen = new Set<string>();
  for (const a of aliases) {
    if (a.trim() === "") return "--alias must not be empty";
    if (a.length > MAX_MODEL) return `--alias '${a.slice(0, 32)}...' is ${a.length} characters; the limit is ${MAX_MODEL}`;
    if (seen.has(a)) return `--alias '${a}' is given twice`;
    if (ids.includes(a)) return `--alias '${a}' is the id of a served model`;
    seen.add(a);
  }
  if (aliases.length > MAX_MODELS - 1) return `at most ${MAX_MODELS - 1} aliases per model (got ${aliases.length})`;
  return null;
}
