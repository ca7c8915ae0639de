// A model this node serves: its engine (once loaded), chat template and status.
// The server starts listening before the model is loaded, so /health and
// /v1/models can say "loading" instead of refusing connections.
import { basename } from "node:path";
import { Engine, type EngineOptions, type ModelInfo } from "../engine";
import { ChatTemplate } from "./chat";

export type ModelStatus = "loading" | "ready" | "failed";

/** One locally served model. */
export class ServedModel {
  status: ModelStatus = "loading";
  engine: Engine | null = null;
  template: ChatTemplate | null = null;
  error: string | null = null;
  /** Settles when loading ends, either way. */
  readonly ready: Promise<void>;

  private constructor(
    readonly id: string,
    readonly path: string,
    opts: EngineOptions,
  ) {
    this.ready = Engine.load(opts).then(
      (engine) => {
        this.engine = engine;
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
      },
      (e: Error) => {
        this.status = "failed";
        this.error = e.message;
      },
    );
  }

  /** Start loading a model; returns at once. */
  static start(opts: EngineOptions & { id?: string }): ServedModel {
    return new ServedModel(opts.id ?? modelIdFromPath(opts.modelPath), opts.modelPath, opts);
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
}

/** The id a model file is served under: its file name without .gguf. */
export function modelIdFromPath(path: string): string {
  return basename(path).replace(/\.gguf$/i, "");
}
