// The kv-pressure workload: overlapping agent tool loops, generated from a
// seed so every target gets byte-identical requests. Nothing here depends on
// what a server answers: the assistant turn sent back is our own tool call, so
// a failed request never changes the rest of the run.

/** Sizes and shape of the workload. */
export interface WorkloadConfig {
  seed: number;
  /** Agent loops running at once. */
  loops: number;
  /** Turns per loop (user message, model reply, tool call and result). */
  turns: number;
  /** Approximate tokens of the system prefix shared by every loop. */
  systemTokens: number;
  /** Approximate tokens of each tool result. */
  toolResultTokens: number;
  /** Approximate tokens of each user message. */
  userTokens: number;
  /** Tokens generated per request (end-of-generation ignored). */
  maxTokens: number;
  /** Delay between the starts of consecutive loops. */
  staggerMs: number;
}

/** An OpenAI chat message as the workload sends it. */
export type ChatMessage =
  | { role: "system" | "user"; content: string }
  | { role: "assistant"; content: null; tool_calls: ToolCall[] }
  | { role: "tool"; tool_call_id: string; content: string };

/** An assistant tool call in OpenAI's shape. */
export interface ToolCall {
  id: string;
  type: "function";
  function: { name: string; arguments: string };
}

/** A function tool definition in OpenAI's shape. */
export interface ToolDef {
  type: "function";
  function: { name: string; description: string; parameters: Record<string, unknown> };
}

/** One turn of a loop. */
export interface TurnPlan {
  user: string;
  stream: boolean;
  toolCall: ToolCall;
  toolResult: string;
}

/** One agent loop. */
export interface LoopPlan {
  index: number;
  /** When the loop starts, relative to the start of the run. */
  startMs: number;
  turns: TurnPlan[];
}

/** Everything sent during a run. */
export interface Workload {
  config: WorkloadConfig;
  system: string;
  tools: ToolDef[];
  loops: LoopPlan[];
}

// Words that the llama SPM tokenizers (llama, phi-3) encode as one token each
// after a space, so N words plus punctuation come close to N tokens.
const WORDS = (
  "the of and to in is was for on that with as by at from this it be are or an have which not but had were " +
  "river mountain engine garden winter market signal orbit silver island tunnel file line value error return " +
  "function module table record query server client request response buffer cache index token model layer " +
  "queue thread process memory system user agent tool result output input status build test check update " +
  "write read open close start stop list path name type data config number string array object field method " +
  "class event stream block batch step count size limit time date version change commit branch merge review " +
  "report note item order price total account"
).split(" ");

const TOOL_NAMES = ["read_file", "run_command", "search_code"] as const;

/** A deterministic pseudo-random generator (mulberry32): the same seed gives the same sequence everywhere. */
export function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** About `tokens` tokens of sentences (a word or a period is about one token). */
export function pseudoText(next: () => number, tokens: number): string {
  const out: string[] = [];
  let n = 0;
  while (n < tokens) {
    const len = Math.min(6 + Math.floor(next() * 10), Math.max(1, tokens - n - 1));
    const sentence: string[] = [];
    for (let i = 0; i < len; i++) sentence.push(WORDS[Math.floor(next() * WORDS.length)] as string);
    const first = sentence[0] as string;
    sentence[0] = first.charAt(0).toUpperCase() + first.slice(1);
    out.push(`${sentence.join(" ")}.`);
    n += len + 1;
  }
  return out.join(" ");
}

const TOOLS: ToolDef[] = [
  {
    type: "function",
    function: {
      name: "read_file",
      description: "Read a file of the repository and return its text.",
      parameters: {
        type: "object",
        properties: { path: { type: "string", description: "path relative to the root" } },
        required: ["path"],
      },
    },
  },
  {
    type: "function",
    function: {
      name: "run_command",
      description: "Run a shell command in the repository and return its output.",
      parameters: { type: "object", properties: { command: { type: "string" } }, required: ["command"] },
    },
  },
  {
    type: "function",
    function: {
      name: "search_code",
      description: "Search the repository for a word and return the matching lines.",
      parameters: { type: "object", properties: { query: { type: "string" } }, required: ["query"] },
    },
  },
];

function toolCall(next: () => number, loop: number, turn: number): ToolCall {
  const name = TOOL_NAMES[Math.floor(next() * TOOL_NAMES.length)] as (typeof TOOL_NAMES)[number];
  const w = () => WORDS[Math.floor(next() * WORDS.length)] as string;
  const args =
    name === "read_file" ? { path: `src/${w()}/${w()}.ts` } : name === "run_command" ? { command: `make ${w()}` } : { query: w() };
  return { id: `call_${loop}_${turn}`, type: "function", function: { name, arguments: JSON.stringify(args) } };
}

/** Build the whole workload from its config (same config, same workload). */
export function buildWorkload(c: WorkloadConfig): Workload {
  const next = rng(c.seed);
  const system = `You are a coding agent working in a large repository. Use the tools to inspect it. Project notes follow. ${pseudoText(next, c.systemTokens)}`;
  const loops: LoopPlan[] = [];
  for (let i = 0; i < c.loops; i++) {
    // Jitter of up to a quarter of the stagger keeps arrivals from lining up on a grid.
    const startMs = Math.round(i * c.staggerMs + (i === 0 ? 0 : next() * c.staggerMs * 0.25));
    const turns: TurnPlan[] = [];
    for (let k = 0; k < c.turns; k++) {
      turns.push({
        // The loop and turn number up front make every loop's conversation its own after the system prefix.
        user: `Task ${i + 1} step ${k + 1}. ${pseudoText(next, c.userTokens)}`,
        stream: next() < 0.5,
        toolCall: toolCall(next, i, k),
        toolResult: pseudoText(next, c.toolResultTokens),
      });
    }
    loops.push({ index: i, startMs, turns });
  }
  return { config: c, system, tools: TOOLS, loops };
}

/** The messages of turn `turn` of a loop: system, every earlier turn's exchange, then this turn's user message. */
export function turnMessages(w: Workload, loop: LoopPlan, turn: number): ChatMessage[] {
  const m: ChatMessage[] = [{ role: "system", content: w.system }];
  for (let k = 0; k < turn; k++) {
    const t = loop.turns[k] as TurnPlan;
    m.push(
      { role: "user", content: t.user },
      { role: "assistant", content: null, tool_calls: [t.toolCall] },
      { role: "tool", tool_call_id: t.toolCall.id, content: t.toolResult },
    );
  }
  m.push({ role: "user", content: (loop.turns[turn] as TurnPlan).user });
  return m;
}

/** The JSON body of a chat request (greedy, fixed length, tools offered). */
export function requestBody(w: Workload, model: string, messages: ChatMessage[], stream: boolean, maxTokens = w.config.maxTokens): object {
  return {
    model,
    messages,
    tools: w.tools,
    tool_choice: "auto",
    max_tokens: maxTokens,
    temperature: 0,
    seed: w.config.seed,
    // A fixed amount of work per request, whatever the (random-weight) model samples.
    ignore_eos: true,
    stream,
    ...(stream ? { stream_options: { include_usage: true } } : {}),
  };
}

// Template overhead per message and for the tool definitions, in tokens; a
// guess on the safe side, used only to size the run before it starts.
const PER_MESSAGE_OVERHEAD = 12;
const TOOLS_OVERHEAD = 250;
const TOOL_CALL_TOKENS = 40;

/** Estimated prompt tokens of turn `turn` (0-based), for sizing a run against a context. */
export function estimatePromptTokens(c: Omit<WorkloadConfig, "turns" | "loops" | "seed" | "staggerMs">, turn: number): number {
  const system = c.systemTokens + 20 + PER_MESSAGE_OVERHEAD + TOOLS_OVERHEAD;
  const perTurn = c.userTokens + 6 + TOOL_CALL_TOKENS + c.toolResultTokens + 3 * PER_MESSAGE_OVERHEAD;
  return system + turn * perTurn + c.userTokens + 6 + PER_MESSAGE_OVERHEAD;
}

/** The most turns whose last prompt plus its reply stays within `share` of the context (at least 1). */
export function turnsThatFit(c: Omit<WorkloadConfig, "turns" | "loops" | "seed" | "staggerMs">, ctx: number, share = 0.85): number {
  let t = 1;
  while (t < 256 && estimatePromptTokens(c, t) + c.maxTokens <= ctx * share) t++;
  return t;
}
