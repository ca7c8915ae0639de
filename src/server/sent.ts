// The body as the client sent it, checked against a route's schema before
// Elysia's validation normalises it: that rebuilds a string sent where an array
// of objects is expected into an array (chat's `messages: "hi"` failed as
// `messages[0].role`) and takes `"5"` for 5 where an integer is expected (a
// token id, max_tokens). Each route's transform hook runs this on the parsed body, so
// such a body gets a 400 naming the field it got wrong, in the route's error
// shape, before anything else happens.
import type { TSchema } from "elysia";
import { badRequest } from "./errors";

type Schema = TSchema & {
  type?: string | string[];
  anyOf?: Schema[];
  properties?: Record<string, Schema>;
  items?: Schema;
  const?: unknown;
  format?: string;
  error?: unknown;
};

const ARTICLE: Record<string, string> = {
  array: "an array",
  object: "an object",
  string: "a string",
  number: "a number",
  integer: "an integer",
  boolean: "a boolean",
  null: "null",
};

/** Whether `value`'s JSON type is one `type` names. */
function typeAccepts(type: string, value: unknown): boolean {
  switch (type) {
    case "array":
      return Array.isArray(value);
    case "object":
      return typeof value === "object" && value !== null && !Array.isArray(value);
    case "integer":
    case "number":
      return typeof value === "number";
    case "null":
      return value === null;
    default:
      return typeof value === type;
  }
}

/**
 * A union's shapes, without those Elysia adds to coerce strings (it rewrites every t.Integer in place
 * into a union with `{type: "string", format: "integer"}`, which takes "105" for 105).
 */
function variants(s: Schema): Schema[] {
  return (s.anyOf ?? []).filter((v) => !(v.type === "string" && (v.format === "integer" || v.format === "numeric")));
}

/** Whether `value` has a JSON type the schema allows (only the type; validation checks the rest). */
function accepts(s: Schema, value: unknown): boolean {
  if (s.anyOf) return variants(s).some((v) => accepts(v, value));
  if (s.const !== undefined) return typeof s.const === typeof value;
  if (s.type === undefined) return true;
  return Array.isArray(s.type) ? s.type.some((t) => typeAccepts(t, value)) : typeAccepts(s.type, value);
}

/** What a schema wants, in words: its own error message, or the types it takes (a nullable field: what it is when present). */
function describe(s: Schema, param: string): string {
  if (typeof s.error === "string") return s.error;
  if (s.anyOf) {
    const present = variants(s).filter((v) => v.type !== "null");
    if (present.length === 1) return describe(present[0] as Schema, param);
  }
  const types = s.anyOf ? variants(s).map((v) => v.type) : [s.type];
  const words = types.flatMap((t) => (typeof t === "string" && ARTICLE[t] ? [ARTICLE[t]] : []));
  return words.length > 0 ? `${param} must be ${words.join(" or ")}` : "invalid value";
}

/**
 * The first place where `value` has a JSON type `schema` does not allow there, as [param, schema], or
 * null. Walks the schema (finite, not the value), so a deeply nested body costs no deeper recursion
 * than the schema has; free-form parts (t.Unknown, records) are not entered.
 */
export function sentMismatch(schema: Schema, value: unknown, param: string): [string, Schema] | null {
  if (value === undefined) return null;
  if (!accepts(schema, value)) return [param, schema];
  let s = schema;
  if (s.anyOf) {
    const fits = variants(s).filter((v) => accepts(v, value));
    if (fits.length !== 1) return null; // several shapes take it: validation tells them apart
    s = fits[0] as Schema;
  }
  if (Array.isArray(value) && s.items) {
    for (let i = 0; i < value.length; i++) {
      const bad = sentMismatch(s.items, value[i], `${param}[${i}]`);
      if (bad) return bad;
    }
  } else if (s.properties && typeof value === "object" && value !== null) {
    for (const [k, ps] of Object.entries(s.properties)) {
      const bad = sentMismatch(ps, (value as Record<string, unknown>)[k], param === "" ? k : `${param}.${k}`);
      if (bad) return bad;
    }
  }
  return null;
}

/** A route's transform hook: 400 naming the first field whose JSON type, as sent, the schema does not allow. */
export function checkSentBody(schema: TSchema): (ctx: { body: unknown }) => void {
  return ({ body }) => {
    // A body that is not an object at all is validation's to refuse (it names no field).
    if (typeof body !== "object" || body === null || Array.isArray(body)) return;
    const bad = sentMismatch(schema as Schema, body, "");
    if (!bad) return;
    const [param, s] = bad;
    throw badRequest(`invalid '${param}': ${describe(s, param)}`, param);
  };
}
