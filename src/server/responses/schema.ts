// Request body of OpenAI's Responses API (POST /v1/responses), as a TypeBox
// schema (Elysia's `t`). Input items, tools and tool_choice are checked one by
// one when the body is translated (translate.ts), so an error names the item
// and its field (`input[2].call_id`). Unknown fields are accepted and ignored,
// as on the other OpenAI routes.
import { t } from "elysia";

const num = (min: number, max: number, name: string) =>
  t.Number({ minimum: min, maximum: max, error: `${name} must be a number from ${min} to ${max}` });

const item = t.Object({}, { additionalProperties: true, error: "input items must be objects" });

const tool = t.Object(
  { type: t.String({ error: "tools[].type must be a string" }) },
  { additionalProperties: true, error: "tools must be an array of tool objects" },
);

/** POST /v1/responses */
export const ResponsesBody = t.Object(
  {
    model: t.String({ minLength: 1, error: "model must be a non-empty string" }),
    input: t.Union([t.String(), t.Array(item, { minItems: 1 })], {
      error: "input must be a string or a non-empty array of input items",
    }),
    instructions: t.Optional(t.Nullable(t.String({ error: "instructions must be a string" }))),
    tools: t.Optional(t.Nullable(t.Array(tool, { error: "tools must be an array of tool objects" }))),
    tool_choice: t.Optional(t.Unknown()),
    parallel_tool_calls: t.Optional(t.Nullable(t.Boolean({ error: "parallel_tool_calls must be a boolean" }))),
    max_output_tokens: t.Optional(t.Nullable(t.Integer({ minimum: 1, error: "max_output_tokens must be an integer >= 1" }))),
    temperature: t.Optional(t.Nullable(num(0, 2, "temperature"))),
    top_p: t.Optional(t.Nullable(num(0, 1, "top_p"))),
    stream: t.Optional(t.Nullable(t.Boolean({ error: "stream must be a boolean" }))),
    store: t.Optional(t.Nullable(t.Boolean({ error: "store must be a boolean" }))),
    metadata: t.Optional(
      t.Nullable(
        t.Record(t.String(), t.String({ maxLength: 512 }), {
          maxProperties: 16,
          error: "metadata must be an object of at most 16 string values of at most 512 characters",
        }),
      ),
    ),
    previous_response_id: t.Optional(t.Nullable(t.String({ minLength: 1, error: "previous_response_id must be a non-empty string" }))),
    user: t.Optional(t.Nullable(t.String({ error: "user must be a string" }))),
  },
  { additionalProperties: true },
);

export type ResponsesBodyT = typeof ResponsesBody.static;
