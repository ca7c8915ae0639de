// Routing's part of a request this node runs itself: the prefix marks the
// engine reports its KV against, the marks of the reply it produced (so the
// conversation's next turn finds its way back here), this node's load while
// it runs, and what the run showed of the model's speed.
import type { EngineLike, PrefixMark } from "../../engine";
import { chatAnchors, completionAnchors, type KeyMessage } from "../../routing";
import type { LocalRouting } from "../mesh";
import type { RunHooks } from "./run";

/** Length of the common prefix of two strings. */
export function commonPrefixLength(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a.charCodeAt(i) === b.charCodeAt(i)) i++;
  return i;
}

/** The marks of `prompt` that end within its common prefix with `other` (the rest renders differently there). */
export function withinPrefix(marks: PrefixMark[], prompt: string, other: string): PrefixMark[] {
  const limit = Buffer.byteLength(prompt.slice(0, commonPrefixLength(prompt, other)), "utf8");
  return marks.filter((m) => m.byteEnd <= limit);
}

/** One local run's routing bookkeeping; a no-op without a mesh. */
export class RoutedRun {
  private started = false;

  constructor(
    private readonly r: LocalRouting | null,
    private readonly modelId: string,
  ) {}

  /** Whether this run reports to routing at all (a node in a mesh). */
  get active(): boolean {
    return this.r !== null;
  }

  /** Marks of a chat prompt rendered from `messages`. */
  chatMarks(messages: readonly KeyMessage[], rendered: string): PrefixMark[] | undefined {
    return this.r ? chatAnchors(this.r.key, messages, rendered) : undefined;
  }

  /** Marks of a completion prompt. */
  completionMarks(prompt: string): PrefixMark[] | undefined {
    return this.r ? completionAnchors(this.r.key, prompt) : undefined;
  }

  /** Hooks for observed(): load while running, speed when done. */
  hooks(): RunHooks {
    const r = this.r;
    if (!r) return {};
    const worker = r.workerId;
    return {
      onStart: () => {
        this.started = true;
        if (worker) r.router.begin(worker);
      },
      onEnd: () => {
        if (this.started && worker) r.router.end(worker);
        this.started = false;
      },
      onDone: (x) => {
        r.router.observe(this.modelId, {
          chars: r.key.chars,
          truncated: r.key.truncated,
          promptTokens: x.promptTokens,
          cachedTokens: x.cachedTokens,
          prefillMs: x.firstTokenAt - x.admittedAt,
          serviceMs: x.endedAt - x.admittedAt,
        });
        r.onReport?.(x);
      },
    };
  }

  /**
   * A completion produced `text` after its prompt: mark the blocks of prompt + text that the prompt's
   * own key lacks (its last, partial chunk grew), so a prompt that continues this text matches here.
   */
  continuation(engine: EngineLike, genId: number, model: string, prompt: string, text: string): void {
    const r = this.r;
    if (!r || text.length === 0) return;
    const grown = r.keyer.completion(model, prompt + text);
    let i = 0;
    while (i < r.key.hashes.length && r.key.hashes[i] === grown.hashes[i]) i++;
    const marks: Array<[string, string | null]> = [];
    for (let j = i; j < grown.hashes.length; j++) marks.push([grown.hashes[j] as string, j > 0 ? (grown.hashes[j - 1] as string) : null]);
    if (marks.length > 0) engine.addMarks(genId, marks);
  }

  /** The generation `genId` produced `reply`: mark its end, so the next turn (which sends it back) matches here. */
  reply(engine: EngineLike, genId: number, reply: KeyMessage): void {
    if (!this.r) return;
    const marks = this.r.keyer.extend(this.r.key, reply);
    if (marks.length > 0) engine.addMarks(genId, marks);
  }
}
