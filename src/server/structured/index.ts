// Structured output: a request's `response_format`, or a tool call its
// `tool_choice` forces, as a GBNF grammar for the engine's grammar sampler;
// and logprobs in OpenAI's shapes.
import type { TokenAlternative, TokenLogprob } from "../../engine";
import { badRequest } from "../errors";
import { alt, type Expr, lit, seq } from "./gbnf";
import { JsonGrammar, jsonObjectGrammar, SchemaError, schemaGrammar } from "./json-schema";

export { MAX_GRAMMAR_BYTES, MAX_SCHEMA_DEPTH, SchemaError, schemaGrammar } from "./json-schema";

/** Which text a forced tool call is written as: the formats the chat route's tool-call parser reads. */
export type ToolCallSyntax = "hermes" | "llama3";

const isObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === "object" && !Array.isArray(v);

const RESPONSE_TYPES = ["text", "json_object", "json_schema"];

/** A SchemaError as the 400 naming its path. */
function schemaRefused(e: unknown): never {
  if (e instanceof SchemaError) throw badRequest(e.message, e.path);
  throw e;
}

/**
 * The grammar a chat body's `response_format` asks for: null for none or `text`. Throws a 400 naming
 * the field (`response_format.type`, `response_format.json_schema.schema.properties.x.pattern`, ...).
 */
export function responseFormatGrammar(rf: unknown): string | null {
  if (rf === undefined || rf === null) return null;
  if (!isObject(rf)) throw badRequest("response_format must be an object with a type", "response_format");
  // A request is checked before routing and converted again to run: convert its schema once.
  const known = converted.get(rf);
  if (known !== undefined) return known;
  const grammar = convertResponseFormat(rf);
  converted.set(rf, grammar);
  return grammar;
}

/** Grammars of response_format objects already converted (only successes: a refusal is thrown each time). */
const converted = new WeakMap<object, string | null>();

function convertResponseFormat(rf: Record<string, unknown>): string | null {
  const type = rf.type;
  if (typeof type !== "string" || !RESPONSE_TYPES.includes(type)) {
    throw badRequest(
      `invalid 'response_format.type': ${JSON.stringify(type ?? null)} is not one of ${RESPONSE_TYPES.join(", ")}`,
      "response_format.type",
    );
  }
  try {
    if (type === "text") return null;
    if (type === "json_object") {
      // llama-server's extension: a schema beside json_object constrains it like json_schema.
      if (rf.schema !== undefined) return schemaGrammar(rf.schema, "response_format.schema");
      return jsonObjectGrammar();
    }
    const js = rf.json_schema;
    if (!isObject(js)) throw badRequest("missing required parameter 'response_format.json_schema'", "response_format.json_schema");
    if (typeof js.name !== "string" || !/^[a-zA-Z0-9_-]{1,64}$/.test(js.name)) {
      throw badRequest(
        "invalid 'response_format.json_schema.name': must be 1 to 64 letters, digits, underscores or dashes",
        "response_format.json_schema.name",
      );
    }
    if (js.strict !== undefined && js.strict !== null && typeof js.strict !== "boolean") {
      throw badRequest("invalid 'response_format.json_schema.strict': must be a boolean", "response_format.json_schema.strict");
    }
    // No schema: any JSON value. strict false is enforced all the same (the grammar is the only way we have to follow a schema).
    if (js.schema === undefined) return schemaGrammar(true, "response_format.json_schema.schema");
    if (!isObject(js.schema) && typeof js.schema !== "boolean") {
      throw badRequest("invalid 'response_format.json_schema.schema': must be a JSON schema object", "response_format.json_schema.schema");
    }
    return schemaGrammar(js.schema, "response_format.json_schema.schema");
  } catch (e) {
    return schemaRefused(e);
  }
}

/** The tool a chat body's tool_choice forces: "*" for any (`required`), a name, or null when none is forced. */
export function forcedTool(toolChoice: unknown): string | null {
  if (toolChoice === "required") return "*";
  if (
    isObject(toolChoice) &&
    toolChoice.type === "function" &&
    isObject(toolChoice.function) &&
    typeof toolChoice.function.name === "string"
  ) {
    return toolChoice.function.name;
  }
  return null;
}

interface ToolDef {
  function: { name: string; parameters?: Record<string, unknown> };
}

/** The 400 for a tool_choice naming a tool that `tools` does not define. */
export function checkForcedTool(tools: readonly ToolDef[] | null | undefined, toolChoice: unknown): void {
  const forced = forcedTool(toolChoice);
  if (forced === null || forced === "*" || !tools || tools.length === 0) return;
  if (!tools.some((t) => t.function.name === forced)) {
    throw badRequest(`invalid 'tool_choice.function.name': no tool named ${JSON.stringify(forced)} in tools`, "tool_choice.function.name");
  }
}

/**
 * The grammar of the tool call a tool_choice forces (`required`: any of the tools; a named function:
 * that one), written in `syntax`, or null when nothing is forced. One call; its arguments follow the
 * tool's parameters schema as far as the converter can enforce it (best effort: what it cannot
 * enforce is left free, never refused, since the tools are the client's definitions, not a format it
 * asked for).
 */
export function toolCallGrammar(tools: readonly ToolDef[] | null | undefined, toolChoice: unknown, syntax: ToolCallSyntax): string | null {
  const forced = forcedTool(toolChoice);
  if (forced === null || !tools || tools.length === 0) return null;
  const chosen = tools.map((t, i) => ({ t, i })).filter(({ t }) => forced === "*" || t.function.name === forced);
  if (chosen.length === 0) return null;
  const build = (lenientArgs: (j: JsonGrammar, params: unknown, path: string) => Expr) => {
    const j = new JsonGrammar({ lenient: true });
    const ws = j.ws();
    const key = syntax === "llama3" ? "parameters" : "arguments";
    const calls = chosen.map(({ t, i }) =>
      seq(
        lit("{"),
        ws,
        lit('"name"'),
        ws,
        lit(":"),
        ws,
        lit(JSON.stringify(t.function.name)),
        ws,
        lit(","),
        ws,
        lit(JSON.stringify(key)),
        ws,
        lit(":"),
        ws,
        lenientArgs(j, t.function.parameters, `tools[${i}].function.parameters`),
        ws,
        lit("}"),
      ),
    );
    const call = j.g.define("call", alt(...calls));
    const root = syntax === "llama3" ? call : seq(lit("<tool_call>"), ws, call, ws, lit("</tool_call>"));
    return j.finish(root, "tools");
  };
  const args = (j: JsonGrammar, params: unknown, path: string): Expr => {
    // A tool without parameters takes an object of anything; its arguments are always an object.
    if (params === undefined || (isObject(params) && Object.keys(params).length === 0)) return j.anyObject();
    return j.value(params, path);
  };
  try {
    return build(args);
  } catch (e) {
    if (!(e instanceof SchemaError)) throw e;
    // A schema even lenient conversion cannot follow (a broken $ref, a grammar too large): any object.
    return build((j) => j.anyObject());
  }
}

/** The logprobs a chat body asks for: the number of alternatives, or undefined for none. 400 for top_logprobs without logprobs. */
export function chatLogprobs(logprobs: boolean | null | undefined, topLogprobs: number | null | undefined): number | undefined {
  if (logprobs === true) return topLogprobs ?? 0;
  if (topLogprobs !== undefined && topLogprobs !== null) {
    throw badRequest("invalid 'top_logprobs': logprobs must be true when top_logprobs is given", "top_logprobs");
  }
  return undefined;
}

const decoder = new TextDecoder();

/** A token's bytes as text (a piece of a multi-byte character shows as U+FFFD; `bytes` has it exactly). */
function tokenText(bytes: number[]): string {
  return decoder.decode(new Uint8Array(bytes));
}

const chatAlternative = (t: TokenAlternative) => ({ token: tokenText(t.bytes), logprob: t.logprob, bytes: t.bytes });

/** One token of OpenAI's chat `logprobs.content`. */
export function chatLogprobEntry(l: TokenLogprob) {
  return { ...chatAlternative(l), top_logprobs: l.top.map(chatAlternative) };
}

export type ChatLogprobEntry = ReturnType<typeof chatLogprobEntry>;

/** The legacy completions `logprobs` object for some tokens; `offset` tracks text offsets across calls (streaming). */
export class CompletionLogprobs {
  private readonly utf8 = new TextDecoder();
  /** Characters of text before the next token: the prompt's, then the generated text's. */
  private offset: number;

  constructor(prompt: string) {
    this.offset = prompt.length;
  }

  /** The legacy shape for these tokens (the next ones of the generation). */
  of(entries: readonly TokenLogprob[]) {
    const out = {
      tokens: [] as string[],
      token_logprobs: [] as number[],
      top_logprobs: [] as Record<string, number>[],
      text_offset: [] as number[],
    };
    for (const l of entries) {
      out.tokens.push(tokenText(l.bytes));
      out.token_logprobs.push(l.logprob);
      const top: Record<string, number> = {};
      for (const t of l.top) {
        const k = tokenText(t.bytes);
        if (!(k in top)) top[k] = t.logprob;
      }
      out.top_logprobs.push(top);
      out.text_offset.push(this.offset);
      this.offset += this.utf8.decode(new Uint8Array(l.bytes), { stream: true }).length;
    }
    return out;
  }
}
