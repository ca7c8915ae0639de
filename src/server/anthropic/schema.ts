// Request bodies of Anthropic's Messages API, as TypeBox schemas (Elysia's `t`).
// Content blocks are checked one by one when the body is translated
// (messages.ts), so an error names the block and its field. Unknown fields are
// accepted and ignored, as on the OpenAI routes.
import { t } from "elysia";

const num = (min: number, max: number, name: string) =>
  t.Number({ minimum: min, maximum: max, error: `${name} must be a number from ${min} to ${max}` });

const block = t.Object({ type: t.String({ error: "a content block's type must be a string" }) }, { additionalProperties: true });

const message = t.Object(
  {
    role: t.Union([t.Literal("user"), t.Literal("assistant")], { error: "role must be 'user' or 'assistant'" }),
    content: t.Union([t.String(), t.Array(block)], { error: "content must be a string or an array of content blocks" }),
  },
  { additionalProperties: true },
);

const system = t.Union([t.String(), t.Array(block)], { error: "system must be a string or an array of text blocks" });

const tool = t.Object(
  {
    type: t.Optional(t.String({ error: "tools[].type must be a string" })),
    name: t.String({ minLength: 1, error: "tools[].name must be a non-empty string" }),
    description: t.Optional(t.String({ error: "tools[].description must be a string" })),
    // Required for custom tools; checked in messages.ts, so a server tool (no schema) gets the right message.
    input_schema: t.Optional(t.Record(t.String(), t.Unknown(), { error: "tools[].input_schema must be a JSON schema object" })),
  },
  { additionalProperties: true },
);

const toolChoice = t.Object(
  {
    type: t.Union([t.Literal("auto"), t.Literal("any"), t.Literal("tool"), t.Literal("none")], {
      error: "tool_choice.type must be one of auto, any, tool, none",
    }),
    name: t.Optional(t.String({ error: "tool_choice.name must be a string" })),
    disable_parallel_tool_use: t.Optional(t.Boolean({ error: "tool_choice.disable_parallel_tool_use must be a boolean" })),
  },
  { additionalProperties: true },
);

/** What every Messages body carries: the conversation and its tools. */
const conversation = {
  model: t.String({ minLength: 1, error: "model must be a non-empty string" }),
  messages: t.Array(message, { minItems: 1, error: "messages must be a non-empty array of messages" }),
  system: t.Optional(system),
  tools: t.Optional(t.Array(tool, { error: "tools must be an array of tools" })),
  tool_choice: t.Optional(toolChoice),
};

/** POST /v1/messages */
export const MessagesBody = t.Object(
  {
    ...conversation,
    max_tokens: t.Integer({ minimum: 1, error: "max_tokens must be an integer >= 1" }),
    stop_sequences: t.Optional(t.Array(t.String(), { maxItems: 16, error: "stop_sequences must be an array of at most 16 strings" })),
    stream: t.Optional(t.Boolean({ error: "stream must be a boolean" })),
    temperature: t.Optional(num(0, 1, "temperature")),
    top_p: t.Optional(num(0, 1, "top_p")),
    top_k: t.Optional(t.Integer({ minimum: 0, error: "top_k must be an integer >= 0" })),
    metadata: t.Optional(t.Object({ user_id: t.Optional(t.Nullable(t.String())) }, { additionalProperties: true })),
    // Structured output ({format: {type: "json_schema", schema}}); checked in messages.ts, naming the field.
    output_config: t.Optional(t.Unknown()),
  },
  { additionalProperties: true },
);

/** POST /v1/messages/count_tokens */
export const CountTokensBody = t.Object(conversation, { additionalProperties: true });

export type MessagesBodyT = typeof MessagesBody.static;
export type CountTokensBodyT = typeof CountTokensBody.static;
