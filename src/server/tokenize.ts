// Tokenizer endpoints for tooling, in llama-server's shapes: POST /tokenize,
// /detokenize and /apply-template. Tokens come from the model's engine (its
// Worker, where llama.cpp runs); the prompt from the same rendering the chat
// route uses. `model` picks among the models a node serves (default: its first).
import { t } from "elysia";
import { badRequest } from "./errors";
import type { ServedModel } from "./model";
import { checkChatBody, renderChatPrompt } from "./openai/chat";
import { engineOf } from "./openai/run";
import type { ChatBodyT } from "./openai/schema";
import { message, tool } from "./openai/schema";

const model = t.Optional(t.String({ minLength: 1, error: "model must be a non-empty string" }));

/** POST /tokenize */
export const TokenizeBody = t.Object(
  {
    model,
    content: t.String({ error: "content must be a string" }),
    add_special: t.Optional(t.Boolean({ error: "add_special must be a boolean" })),
    parse_special: t.Optional(t.Boolean({ error: "parse_special must be a boolean" })),
    with_pieces: t.Optional(t.Boolean({ error: "with_pieces must be a boolean" })),
  },
  { additionalProperties: true },
);

/** POST /detokenize */
export const DetokenizeBody = t.Object(
  { model, tokens: t.Array(t.Integer({ error: "token ids must be integers" }), { error: "tokens must be an array of token ids" }) },
  { additionalProperties: true },
);

/** POST /apply-template: a chat body; fields that do not shape the prompt are accepted and ignored. */
export const ApplyTemplateBody = t.Object(
  {
    model,
    messages: t.Array(message, { minItems: 1, error: "messages must be a non-empty array of messages" }),
    tools: t.Optional(t.Nullable(t.Array(tool))),
    tool_choice: t.Optional(t.Unknown()),
  },
  { additionalProperties: true },
);

export type TokenizeBodyT = typeof TokenizeBody.static;
export type DetokenizeBodyT = typeof DetokenizeBody.static;
export type ApplyTemplateBodyT = typeof ApplyTemplateBody.static;

const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

/** A piece as llama-server shows it: its text when it is valid UTF-8, else its bytes (part of a character). */
function pieceJson(bytes: Uint8Array): string | number[] {
  try {
    return strictUtf8.decode(bytes);
  } catch {
    return Array.from(bytes);
  }
}

/**
 * Text to token ids. As in llama-server, special tokens are not added (`add_special`, default false)
 * and special-token text is parsed (`parse_special`, default true); with `with_pieces`, each token
 * comes as `{id, piece}`.
 */
export async function tokenize(m: ServedModel, body: TokenizeBodyT): Promise<object> {
  const engine = engineOf(m);
  const tokens = await engine.tokenize(body.content, { addSpecial: body.add_special ?? false, parseSpecial: body.parse_special ?? true });
  if (!body.with_pieces) return { tokens };
  const pieces = await engine.pieces(tokens);
  return { tokens: tokens.map((id, i) => ({ id, piece: pieceJson(pieces[i] ?? new Uint8Array(0)) })) };
}

/** Token ids to text, special tokens as their text (as llama-server renders them); an id outside the vocabulary is a 400 naming it. */
export async function detokenize(m: ServedModel, body: DetokenizeBodyT): Promise<object> {
  const engine = engineOf(m);
  const n = engine.info.nVocab;
  const bad = body.tokens.findIndex((id) => id < 0 || id >= n);
  if (bad >= 0) throw badRequest(`tokens[${bad}] is ${body.tokens[bad]}: token ids run from 0 to ${n - 1}`, `tokens[${bad}]`);
  return { content: await engine.detokenize(body.tokens, { special: true }) };
}

/**
 * The prompt the chat route renders for these messages and tools, exactly: tokenized with
 * add_special (the BOS the tokenizer adds is not in the text) it is the prompt the engine runs.
 */
export function applyTemplate(m: ServedModel, body: ApplyTemplateBodyT): object {
  const chat = body as unknown as ChatBodyT;
  checkChatBody(chat);
  engineOf(m);
  return { prompt: renderChatPrompt(m, chat) };
}
