// JSON schemas the structured-output tests constrain the tiny model with.

/** Schemas with every string bounded, so even random weights finish within the token budget. */
export const SCHEMAS: Record<string, Record<string, unknown>> = {
  person: {
    type: "object",
    properties: {
      name: { type: "string", maxLength: 12 },
      age: { type: "integer", minimum: 0 },
      role: { enum: ["admin", "user", "guest"] },
      verified: { type: "boolean" },
    },
    required: ["name", "age", "role", "verified"],
    additionalProperties: false,
  },
  nested: {
    type: "object",
    properties: {
      id: { type: "string", format: "uuid" },
      tags: { type: "array", items: { type: "string", maxLength: 6 }, minItems: 1, maxItems: 3 },
      address: {
        type: "object",
        properties: { city: { type: "string", maxLength: 10 }, zip: { type: ["integer", "null"] } },
        required: ["city", "zip"],
        additionalProperties: false,
      },
      score: { type: "integer", minimum: 1, maximum: 5 },
      note: { anyOf: [{ type: "null" }, { const: "n/a" }] },
    },
    required: ["id", "tags", "address", "score", "note"],
    additionalProperties: false,
  },
  tree: {
    $defs: {
      node: {
        type: "object",
        properties: {
          v: { type: "integer", minimum: 0, maximum: 9 },
          kids: { type: "array", items: { $ref: "#/$defs/node" }, maxItems: 2 },
        },
        required: ["v", "kids"],
        additionalProperties: false,
      },
    },
    $ref: "#/$defs/node",
  },
  list: { type: "array", items: { enum: [1, 2, 3] }, minItems: 2, maxItems: 4 },
};
