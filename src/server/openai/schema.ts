// Request bodies of the OpenAI API, as TypeBox schemas (Elysia's `t`). Unknown
// fields are accepted and ignored, as OpenAI's own server does.
import { t } from "elysia";

const stop = t.Union([t.String(), t.Array(t.String(), { maxItems: 16 })], {
  error: "stop must be a string or an array of at most 16 strings",
});
const num = (min: number, max: number, name: string) =>
  t.Number({ minimum: min, maximum: max, error: `${name} must be a number from ${min} to ${max}` });
const int = (min: number, name: string) => t.Integer({ minimum: min, error: `${name} must be an integer >= ${min}` });

/** Sampling and length fields shared by chat and completions (plus llama.cpp extensions). */
const common = {
  model: t.String({ minLength: 1, error: "model must be a non-empty string" }),
  stream: t.Optional(t.Boolean({ error: "stream must be a boolean" })),
  stream_options: t.Optional(t.Nullable(t.Object({ include_usage: t.Optional(t.Boolean()) }))),
  max_tokens: t.Optional(t.Nullable(int(1, "max_tokens"))),
  temperature: t.Optional(t.Nullable(num(0, 2, "temperature"))),
  top_p: t.Optional(t.Nullable(num(0, 1, "top_p"))),
  frequency_penalty: t.Optional(t.Nullable(num(-2, 2, "frequency_penalty"))),
  presence_penalty: t.Optional(t.Nullable(num(-2, 2, "presence_penalty"))),
  seed: t.Optional(t.Nullable(t.Integer({ error: "seed must be an integer" }))),
  stop: t.Optional(t.Nullable(stop)),
  n: t.Optional(t.Nullable(t.Integer({ error: "n must be an integer" }))),
  user: t.Optional(t.String()),
  // llama.cpp-style extensions
  top_k: t.Optional(int(0, "top_k")),
  min_p: t.Optional(num(0, 1, "min_p")),
  repeat_penalty: t.Optional(num(0, 10, "repeat_penalty")),
  ignore_eos: t.Optional(t.Boolean({ error: "ignore_eos must be a boolean" })),
};

const textPart = t.Object({ type: t.String(), text: t.Optional(t.String()) }, { additionalProperties: true });
const content = t.Union([t.String(), t.Null(), t.Array(textPart)], {
  error: "content must be a string, null or an array of content parts",
});
const toolCall = t.Object({
  id: t.String(),
  type: t.Literal("function"),
  function: t.Object({ name: t.String(), arguments: t.String() }),
});

/** One chat message. */
export const message = t.Object(
  {
    role: t.Union([t.Literal("system"), t.Literal("developer"), t.Literal("user"), t.Literal("assistant"), t.Literal("tool")], {
      error: "role must be one of system, developer, user, assistant, tool",
    }),
    content: t.Optional(content),
    name: t.Optional(t.String()),
    tool_calls: t.Optional(t.Array(toolCall)),
    tool_call_id: t.Optional(t.String()),
  },
  { additionalProperties: true },
);

/** One tool definition. */
export const tool = t.Object({
  type: t.Literal("function", { error: "tools[].type must be 'function'" }),
  function: t.Object({
    name: t.String({ minLength: 1, error: "tools[].function.name must be a non-empty string" }),
    description: t.Optional(t.String()),
    parameters: t.Optional(t.Record(t.String(), t.Unknown())),
    strict: t.Optional(t.Nullable(t.Boolean())),
  }),
});

/** POST /v1/chat/completions */
export const ChatBody = t.Object(
  {
    ...common,
    messages: t.Array(message, { minItems: 1, error: "messages must be a non-empty array of messages" }),
    max_completion_tokens: t.Optional(t.Nullable(int(1, "max_completion_tokens"))),
    tools: t.Optional(t.Nullable(t.Array(tool))),
    tool_choice: t.Optional(t.Unknown()),
    // Checked field by field in structured/ (a 400 names e.g. response_format.json_schema.schema.properties.x.pattern).
    response_format: t.Optional(t.Unknown()),
    logprobs: t.Optional(t.Nullable(t.Boolean({ error: "logprobs must be a boolean" }))),
    top_logprobs: t.Optional(t.Nullable(t.Integer({ minimum: 0, maximum: 20, error: "top_logprobs must be an integer from 0 to 20" }))),
  },
  { additionalProperties: true },
);

/** POST /v1/completions */
export const CompletionBody = t.Object(
  {
    ...common,
    prompt: t.Union([t.String(), t.Array(t.String(), { minItems: 1, maxItems: 1 })], {
      error: "prompt must be a string (or an array holding one string)",
    }),
    echo: t.Optional(t.Boolean()),
    logprobs: t.Optional(t.Nullable(t.Integer({ minimum: 0, maximum: 20, error: "logprobs must be an integer from 0 to 20" }))),
    // As on chat: checked in structured/, so a 400 names the schema path.
    response_format: t.Optional(t.Unknown()),
  },
  { additionalProperties: true },
);

export type ChatBodyT = typeof ChatBody.static;
export type CompletionBodyT = typeof CompletionBody.static;
