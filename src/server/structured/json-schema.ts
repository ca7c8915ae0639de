// JSON Schema -> GBNF, our own converter (llama.cpp ships one in C++ and
// Python; this one is TypeScript so the server can refuse a schema with a 400
// naming the keyword and its path before anything is routed or queued).
//
// Every text the grammar accepts is a JSON value valid against the schema; the
// converter may accept less than the schema allows (a narrower but still valid
// language), never more. Hence:
// - objects: declared properties in schema order, required ones always, optional
//   ones maybe; no undeclared properties unless the schema declares no
//   properties and allows others (a map);
// - oneOf is written as anyOf (exclusivity is not checked);
// - whitespace between tokens is bounded, and so are numbers' digits, so a
//   model cannot spin forever inside one value.
// Supported: type (incl. arrays of types and OpenAPI `nullable`), object
// (properties, required, additionalProperties), array (items, prefixItems,
// minItems, maxItems), string (minLength, maxLength up to MAX_REPEAT, format
// date / time / date-time / uuid), integer and number (minimum 0, integer
// minimum 1 / exclusiveMinimum 0, integer ranges of up to 256 values), boolean,
// null, enum, const, anyOf, oneOf, allOf of one schema, and $ref into the same
// document (#, #/$defs/..., #/definitions/..., any JSON pointer), recursive ones
// included when they can finish. Anything else is refused (strict) or, for tool
// parameters (lenient), left unconstrained.
import { alt, cls, type Expr, Grammar, lit, MAX_REPEAT, opt, ref, rep, seq } from "./gbnf";

/** A schema the converter refuses: `path` is where in the request (e.g. `response_format.json_schema.schema.properties.x.pattern`). */
export class SchemaError extends Error {
  constructor(
    readonly path: string,
    message: string,
  ) {
    super(message);
    this.name = "SchemaError";
  }
}

/** Deepest schema nesting the converter walks. */
export const MAX_SCHEMA_DEPTH = 64;
/** Largest grammar text we hand to llama.cpp. */
export const MAX_GRAMMAR_BYTES = 128 * 1024;
/** Most rules in one grammar (each costs the grammar sampler per token). */
export const MAX_RULES = 4096;
/** Most values an integer range may be spelled out as. */
const MAX_RANGE = 256;

/** Keywords that only describe: ignored. */
const ANNOTATIONS = new Set([
  "title",
  "description",
  "default",
  "examples",
  "example",
  "$schema",
  "$id",
  "$comment",
  "deprecated",
  "readOnly",
  "writeOnly",
  "$defs",
  "definitions",
  "discriminator",
  "strict",
]);

/** Keywords we know and do not enforce: strict refuses them, lenient ignores them. */
const UNSUPPORTED = new Set([
  "pattern",
  "patternProperties",
  "propertyNames",
  "minProperties",
  "maxProperties",
  "uniqueItems",
  "contains",
  "minContains",
  "maxContains",
  "not",
  "if",
  "then",
  "else",
  "dependentRequired",
  "dependentSchemas",
  "dependencies",
  "unevaluatedProperties",
  "unevaluatedItems",
  "additionalItems",
  "multipleOf",
  "maximum",
  "exclusiveMaximum",
  "contentEncoding",
  "contentMediaType",
  "contentSchema",
  "$dynamicRef",
  "$recursiveRef",
  "$anchor",
  "$dynamicAnchor",
  "$recursiveAnchor",
]);

const TYPES = ["null", "boolean", "object", "array", "number", "integer", "string"] as const;
type JsonType = (typeof TYPES)[number];

/** String formats with a grammar of their own. */
const FORMATS = ["date", "time", "date-time", "uuid"] as const;

type Schema = Record<string, unknown>;

/** Where a conversion is: the document $refs resolve in, its path, and the $ref rules entered since anything was last written. */
interface Ctx {
  doc: unknown;
  rootPath: string;
  unconsumed: Set<string>;
}

/** How a conversion treats what it cannot enforce. */
export interface ConvertOptions {
  /** Ignore unsupported keywords instead of refusing them (tool parameters: best effort). */
  lenient?: boolean;
}

const isObject = (v: unknown): v is Schema => v !== null && typeof v === "object" && !Array.isArray(v);

/** JSON pointer segment decoding (~1 -> /, ~0 -> ~). */
const unescapePointer = (s: string) => decodeURIComponent(s).replaceAll("~1", "/").replaceAll("~0", "~");

/**
 * Converts schemas into rules of one Grammar, sharing the JSON primitives;
 * several schemas (one per tool) can go into the same grammar.
 */
export class JsonGrammar {
  readonly g = new Grammar();
  private readonly prims = new Map<string, Expr>();
  /** Rules of $ref targets, by document and pointer. */
  private readonly refRules = new Map<string, { doc: unknown; pointer: string; name: string }[]>();
  /** Where each $ref rule was first referenced, for errors. */
  private readonly refOrigins = new Map<string, string>();

  constructor(private readonly o: ConvertOptions = {}) {}

  /** Whitespace between tokens: nothing, a space, or one newline and up to 20 indentation characters. */
  ws(): Expr {
    return this.prim("ws", () => alt(lit(""), lit(" "), seq(lit("\n"), rep(cls("[ \\t]"), 0, 20))));
  }

  /** Any JSON value (objects and arrays of any values, recursively). */
  anyValue(): Expr {
    const known = this.prims.get("value");
    if (known) return known;
    const name = this.g.reserve("value");
    const value = ref(name);
    this.prims.set("value", value);
    const ws = this.ws();
    const member = this.g.define("member", seq(this.string(), ws, lit(":"), ws, value));
    const object = this.g.define("object", seq(lit("{"), ws, opt(seq(member, rep(seq(ws, lit(","), ws, member), 0, null))), ws, lit("}")));
    const array = this.g.define("array", seq(lit("["), ws, opt(seq(value, rep(seq(ws, lit(","), ws, value), 0, null))), ws, lit("]")));
    this.prims.set("object", object);
    this.g.set(name, alt(object, array, this.string(), this.number(false), this.boolean(), lit("null")));
    return value;
  }

  /** Any JSON object. */
  anyObject(): Expr {
    this.anyValue();
    return this.prims.get("object") as Expr;
  }

  /** A JSON string of any length (or between min and max characters). */
  string(min = 0, max: number | null = null): Expr {
    const char = this.prim("char", () =>
      alt(cls('[^"\\\\\\x7F\\x00-\\x1F]'), seq(lit("\\"), alt(cls('["\\\\/bfnrt]'), seq(lit("u"), rep(cls("[0-9a-fA-F]"), 4, 4))))),
    );
    const body = seq(lit('"'), rep(char, min, max), lit('"'));
    return min === 0 && max === null ? this.prim("string", () => body) : this.g.define(`string-${min}-${max ?? "n"}`, body);
  }

  boolean(): Expr {
    return this.prim("boolean", () => alt(lit("true"), lit("false")));
  }

  /** An integer (up to 16 digits); nonNegative drops the sign, positive also the zero. */
  integer(bound: "any" | "nonneg" | "positive" = "any"): Expr {
    const digits = this.prim("int-digits", () => alt(lit("0"), seq(cls("[1-9]"), rep(cls("[0-9]"), 0, 15))));
    if (bound === "positive") return this.prim("positive-integer", () => seq(cls("[1-9]"), rep(cls("[0-9]"), 0, 15)));
    if (bound === "nonneg") return digits;
    return this.prim("integer", () => seq(opt(lit("-")), digits));
  }

  /** A number (up to 16 digits each side of the point, exponent up to 3 digits); nonNegative drops the sign. */
  number(nonNegative: boolean): Expr {
    const digits = this.integer("nonneg");
    const frac = this.prim("frac", () => seq(lit("."), rep(cls("[0-9]"), 1, 16)));
    const exp = this.prim("exp", () => seq(cls("[eE]"), opt(cls("[-+]")), rep(cls("[0-9]"), 1, 3)));
    const body = seq(digits, opt(frac), opt(exp));
    return nonNegative ? this.prim("nonneg-number", () => body) : this.prim("number", () => seq(opt(lit("-")), body));
  }

  /** One value of `schema`; `path` names it in errors. Throws SchemaError. */
  value(schema: unknown, path: string, root: unknown = schema): Expr {
    return this.convert(schema, path, 0, { doc: root, rootPath: path, unconsumed: new Set() });
  }

  /** Refuse a grammar that cannot finish or is too large; returns its text. */
  finish(root: Expr, path: string): string {
    const stuck = this.g.unfinishable(root);
    if (stuck.length > 0) {
      const origin = stuck.map((n) => this.refOrigins.get(n)).find((p) => p !== undefined);
      throw new SchemaError(
        origin ?? path,
        `${origin ?? path}: no finite JSON value matches this schema (a recursive $ref without a way out, e.g. a required property that refers back to its own object)`,
      );
    }
    const text = this.g.text(root);
    const rules = text.split("\n").length;
    if (text.length > MAX_GRAMMAR_BYTES || rules > MAX_RULES) {
      throw new SchemaError(
        path,
        `${path}: the schema is too large to enforce (its grammar has ${rules} rules, ${text.length} bytes; at most ${MAX_RULES} rules, ${MAX_GRAMMAR_BYTES} bytes)`,
      );
    }
    return text;
  }

  private prim(name: string, build: () => Expr): Expr {
    let r = this.prims.get(name);
    if (!r) {
      const n = this.g.reserve(name);
      r = ref(n);
      this.prims.set(name, r);
      this.g.set(n, build());
    }
    return r;
  }

  private fail(path: string, message: string): never {
    throw new SchemaError(path, `${path}: ${message}`);
  }

  /** An unsupported keyword: refused, or ignored when lenient. */
  private unsupported(path: string, message: string): void {
    if (!this.o.lenient) this.fail(path, message);
  }

  private convert(s: unknown, path: string, depth: number, ctx: Ctx): Expr {
    if (depth > MAX_SCHEMA_DEPTH) this.fail(path, `the schema is nested deeper than ${MAX_SCHEMA_DEPTH} levels`);
    if (s === true) return this.anyValue();
    if (s === false) this.fail(path, "the schema `false` matches no value");
    if (!isObject(s)) this.fail(path, "a schema must be an object or a boolean");
    // Inside an object or array something has been written: a $ref met again there is recursion, not a loop.
    const down: Ctx = { ...ctx, unconsumed: new Set<string>() };
    const used = new Set<string>();
    const use = (...ks: string[]) => {
      for (const k of ks) used.add(k);
    };
    let result: Expr;

    const combinator = ["$ref", "anyOf", "oneOf", "allOf"].find((k) => k in s);
    if (combinator) {
      // Keywords beside these would have to hold too: merging schemas is not supported.
      for (const k of Object.keys(s)) {
        if (k !== combinator && TYPE_KEYWORDS.has(k) && !("const" in s || "enum" in s)) {
          this.unsupported(
            `${path}.${k}`,
            `'${k}' beside '${combinator}' is not supported in structured output (move it into the referenced schema or each branch)`,
          );
          use(k);
        }
      }
    }
    if ("$ref" in s) {
      use("$ref");
      result = this.reference(s.$ref, `${path}.$ref`, depth, ctx);
    } else if ("const" in s) {
      use("const", "type", "enum");
      result = this.literal(s.const, `${path}.const`);
    } else if ("enum" in s) {
      use("enum", "type");
      const values = s.enum;
      if (!Array.isArray(values) || values.length === 0) this.fail(`${path}.enum`, "enum must be a non-empty array");
      result = alt(...values.map((v, i) => this.literal(v, `${path}.enum[${i}]`)));
    } else if ("anyOf" in s || "oneOf" in s) {
      const key = "anyOf" in s ? "anyOf" : "oneOf";
      use(key);
      const branches = s[key];
      if (!Array.isArray(branches) || branches.length === 0) this.fail(`${path}.${key}`, `${key} must be a non-empty array of schemas`);
      result = alt(...branches.map((b, i) => this.convert(b, `${path}.${key}[${i}]`, depth + 1, ctx)));
    } else if ("allOf" in s) {
      use("allOf");
      const parts = s.allOf;
      if (!Array.isArray(parts) || parts.length !== 1) {
        this.unsupported(`${path}.allOf`, "'allOf' is supported with exactly one schema in structured output");
        result = Array.isArray(parts) && parts.length > 0 ? this.convert(parts[0], `${path}.allOf[0]`, depth + 1, ctx) : this.anyValue();
      } else result = this.convert(parts[0], `${path}.allOf[0]`, depth + 1, ctx);
    } else {
      result = this.typed(s, path, depth, down, use);
    }
    if (s.nullable === true) result = alt(result, lit("null"));
    use("nullable");

    for (const k of Object.keys(s)) {
      if (used.has(k) || ANNOTATIONS.has(k)) continue;
      if (UNSUPPORTED.has(k)) this.unsupported(`${path}.${k}`, `'${k}' is not supported in structured output`);
    }
    return result;
  }

  /** A schema by its type keyword(s), or by the keywords it has when it names no type. */
  private typed(s: Schema, path: string, depth: number, ctx: Ctx, use: (...ks: string[]) => void): Expr {
    let types: JsonType[];
    if ("type" in s) {
      use("type");
      const t = s.type;
      const list = Array.isArray(t) ? t : [t];
      if (list.length === 0) this.fail(`${path}.type`, "type must be a type name or a non-empty array of them");
      types = list.map((x, i) => {
        if (!TYPES.includes(x as JsonType))
          this.fail(Array.isArray(t) ? `${path}.type[${i}]` : `${path}.type`, `unknown type ${JSON.stringify(x)}`);
        return x as JsonType;
      });
    } else if ("properties" in s || "additionalProperties" in s || "required" in s) types = ["object"];
    else if ("items" in s || "prefixItems" in s || "minItems" in s || "maxItems" in s) types = ["array"];
    else if ("minLength" in s || "maxLength" in s || "format" in s || "pattern" in s) types = ["string"];
    else if ("minimum" in s || "maximum" in s || "exclusiveMinimum" in s || "exclusiveMaximum" in s || "multipleOf" in s)
      types = ["number"];
    else {
      // No type: any value, unless it carries keywords we cannot enforce.
      return this.anyValue();
    }
    const exprs = [...new Set(types)].map((t) => {
      switch (t) {
        case "null":
          return lit("null");
        case "boolean":
          return this.boolean();
        case "string":
          return this.stringOf(s, path, use);
        case "integer":
        case "number":
          return this.numberOf(s, path, t, use);
        case "array":
          return this.arrayOf(s, path, depth, ctx, use);
        default:
          return this.objectOf(s, path, depth, ctx, use);
      }
    });
    return alt(...exprs);
  }

  private stringOf(s: Schema, path: string, use: (...ks: string[]) => void): Expr {
    use("minLength", "maxLength", "format");
    const min = this.bound(s.minLength, `${path}.minLength`) ?? 0;
    const max = this.bound(s.maxLength, `${path}.maxLength`);
    if (max !== null && max < min) this.fail(`${path}.maxLength`, `maxLength ${max} is less than minLength ${min}`);
    if (s.format !== undefined) {
      const f = s.format;
      if (FORMATS.includes(f as (typeof FORMATS)[number])) {
        if (s.minLength !== undefined || s.maxLength !== undefined) {
          this.unsupported(`${path}.format`, "'format' together with minLength/maxLength is not supported in structured output");
        }
        return this.formatted(f as (typeof FORMATS)[number]);
      }
      this.unsupported(
        `${path}.format`,
        `format ${JSON.stringify(f)} is not supported in structured output (supported: ${FORMATS.join(", ")})`,
      );
    }
    return this.string(min, max);
  }

  /** A non-negative integer bound (minLength, maxItems...) at most MAX_REPEAT; null when absent. */
  private bound(v: unknown, path: string): number | null {
    if (v === undefined) return null;
    if (typeof v !== "number" || !Number.isInteger(v) || v < 0) this.fail(path, "must be a non-negative integer");
    if (v > MAX_REPEAT) {
      if (this.o.lenient) return null;
      this.fail(path, `${v} is larger than structured output can enforce (at most ${MAX_REPEAT})`);
    }
    return v;
  }

  private formatted(f: (typeof FORMATS)[number]): Expr {
    const d = (n: number) => rep(cls("[0-9]"), n, n);
    const date = () =>
      this.prim("date", () =>
        seq(
          d(4),
          lit("-"),
          alt(seq(lit("0"), cls("[1-9]")), seq(lit("1"), cls("[0-2]"))),
          lit("-"),
          alt(seq(lit("0"), cls("[1-9]")), seq(cls("[12]"), cls("[0-9]")), seq(lit("3"), cls("[01]"))),
        ),
      );
    const time = () =>
      this.prim("time", () => {
        const hh = alt(seq(cls("[01]"), cls("[0-9]")), seq(lit("2"), cls("[0-3]")));
        const mm = seq(cls("[0-5]"), cls("[0-9]"));
        return seq(
          hh,
          lit(":"),
          mm,
          lit(":"),
          // RFC 3339: a leap second is :60.
          alt(mm, lit("60")),
          opt(seq(lit("."), rep(cls("[0-9]"), 1, 9))),
          alt(lit("Z"), seq(cls("[+-]"), hh, lit(":"), mm)),
        );
      });
    switch (f) {
      case "date":
        return this.prim("date-string", () => seq(lit('"'), date(), lit('"')));
      case "time":
        return this.prim("time-string", () => seq(lit('"'), time(), lit('"')));
      case "date-time":
        return this.prim("date-time-string", () => seq(lit('"'), date(), lit("T"), time(), lit('"')));
      case "uuid": {
        const h = (n: number) => rep(cls("[0-9a-fA-F]"), n, n);
        return this.prim("uuid-string", () =>
          seq(lit('"'), h(8), lit("-"), h(4), lit("-"), h(4), lit("-"), h(4), lit("-"), h(12), lit('"')),
        );
      }
    }
  }

  private numberOf(s: Schema, path: string, t: "integer" | "number", use: (...ks: string[]) => void): Expr {
    use("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum");
    const { minimum, maximum, exclusiveMinimum: exMin, exclusiveMaximum: exMax } = s;
    for (const [k, v] of Object.entries({ minimum, maximum })) {
      if (v !== undefined && typeof v !== "number") this.fail(`${path}.${k}`, `${k} must be a number`);
    }
    // Draft 4 wrote exclusive bounds as booleans beside minimum/maximum.
    let lo: number | null = typeof minimum === "number" ? minimum : null;
    let loExclusive = false;
    if (typeof exMin === "number") {
      if (lo === null || exMin >= lo) {
        lo = exMin;
        loExclusive = true;
      }
    } else if (exMin === true) loExclusive = true;
    let hi: number | null = typeof maximum === "number" ? maximum : null;
    let hiExclusive = false;
    if (typeof exMax === "number") {
      if (hi === null || exMax <= hi) {
        hi = exMax;
        hiExclusive = true;
      }
    } else if (exMax === true) hiExclusive = true;
    const loKey = loExclusive && typeof exMin === "number" ? "exclusiveMinimum" : "minimum";
    const hiKey = hiExclusive && typeof exMax === "number" ? "exclusiveMaximum" : "maximum";
    if (t === "integer") {
      // Spelled-out ranges: small closed ranges as their values.
      const first = lo === null ? null : loExclusive ? Math.floor(lo) + 1 : Math.ceil(lo);
      const last = hi === null ? null : hiExclusive ? Math.ceil(hi) - 1 : Math.floor(hi);
      if (first !== null && last !== null) {
        if (last < first) this.fail(`${path}.${hiKey}`, `no integer lies between ${loKey} ${lo} and ${hiKey} ${hi}`);
        if (last - first < MAX_RANGE) return alt(...Array.from({ length: last - first + 1 }, (_, i) => lit(String(first + i))));
      }
      if (hi !== null) {
        this.unsupported(
          `${path}.${hiKey}`,
          `'${hiKey}' is supported in structured output only with a minimum less than ${MAX_RANGE} below it`,
        );
      }
      if (first === null || first < 0) {
        if (first !== null)
          this.unsupported(`${path}.${loKey}`, `'${loKey}' is supported in structured output only as 0 or 1 (or in a closed range)`);
        return this.integer("any");
      }
      if (first === 0) return this.integer("nonneg");
      if (first === 1) return this.integer("positive");
      this.unsupported(`${path}.${loKey}`, `'${loKey}' is supported in structured output only as 0 or 1 (or in a closed range)`);
      return this.integer("positive");
    }
    if (hi !== null) this.unsupported(`${path}.${hiKey}`, `'${hiKey}' is not supported for numbers in structured output`);
    if (lo === null) return this.number(false);
    if (lo === 0 && !loExclusive) return this.number(true);
    this.unsupported(`${path}.${loKey}`, `'${loKey}' is supported for numbers in structured output only as minimum 0`);
    return lo >= 0 ? this.number(true) : this.number(false);
  }

  private arrayOf(s: Schema, path: string, depth: number, ctx: Ctx, use: (...ks: string[]) => void): Expr {
    use("items", "prefixItems", "minItems", "maxItems", "uniqueItems", "contains");
    if (s.uniqueItems === true) this.unsupported(`${path}.uniqueItems`, "'uniqueItems' is not supported in structured output");
    if (s.contains !== undefined) this.unsupported(`${path}.contains`, "'contains' is not supported in structured output");
    const min = this.bound(s.minItems, `${path}.minItems`) ?? 0;
    const max = this.bound(s.maxItems, `${path}.maxItems`);
    if (max !== null && max < min) this.fail(`${path}.maxItems`, `maxItems ${max} is less than minItems ${min}`);
    const ws = this.ws();
    // Tuples: prefixItems (2020-12) or an items array (draft 7); exactly those items are written.
    const tupleKey = Array.isArray(s.prefixItems) ? "prefixItems" : Array.isArray(s.items) ? "items" : null;
    if (tupleKey) {
      const items = s[tupleKey] as unknown[];
      if (items.length < min || (max !== null && items.length > max)) {
        this.unsupported(
          `${path}.${tupleKey}`,
          `a tuple of ${items.length} items with minItems/maxItems that exclude that length is not supported`,
        );
      }
      if (items.length === 0) return seq(lit("["), ws, lit("]"));
      const parts = items.map((x, i) => this.convert(x, `${path}.${tupleKey}[${i}]`, depth + 1, ctx));
      const body: Expr[] = [lit("["), ws];
      parts.forEach((p, i) => {
        if (i > 0) body.push(ws, lit(","), ws);
        body.push(p);
      });
      body.push(ws, lit("]"));
      return seq(...body);
    }
    if (s.items === false || max === 0) return seq(lit("["), ws, lit("]"));
    const item = this.g.define(
      `${pathHint(path)}-item`,
      s.items === undefined ? this.anyValue() : this.convert(s.items, `${path}.items`, depth + 1, ctx),
    );
    const more = rep(seq(ws, lit(","), ws, item), Math.max(0, min - 1), max === null ? null : max - 1);
    const list = seq(item, more);
    return this.g.define(`${pathHint(path)}-array`, seq(lit("["), ws, min === 0 ? opt(list) : list, ws, lit("]")));
  }

  private objectOf(s: Schema, path: string, depth: number, ctx: Ctx, use: (...ks: string[]) => void): Expr {
    use("properties", "required", "additionalProperties");
    const ws = this.ws();
    const props = s.properties ?? {};
    if (!isObject(props)) this.fail(`${path}.properties`, "properties must be an object of schemas");
    const required = s.required ?? [];
    if (!Array.isArray(required) || required.some((r) => typeof r !== "string"))
      this.fail(`${path}.required`, "required must be an array of property names");
    const extra = s.additionalProperties;
    if (extra !== undefined && typeof extra !== "boolean" && !isObject(extra)) {
      this.fail(`${path}.additionalProperties`, "additionalProperties must be a boolean or a schema");
    }
    const names = Object.keys(props);
    const req = new Set(required as string[]);
    const hint = pathHint(path);
    const kv = (name: string, value: Expr) => this.g.define(`${hint}-${name}-kv`, seq(lit(JSON.stringify(name)), ws, lit(":"), ws, value));
    const entries: { kv: Expr; required: boolean }[] = names.map((name) => ({
      kv: kv(name, this.convert(props[name], `${path}.properties.${name}`, depth + 1, ctx)),
      required: req.has(name),
    }));
    // Required properties the schema does not declare: present, valued as additionalProperties allows.
    for (const name of req) {
      if (name in props) continue;
      if (extra === false) this.fail(`${path}.required`, `'${name}' is required but not in properties, and additionalProperties is false`);
      const value = isObject(extra) ? this.convert(extra, `${path}.additionalProperties`, depth + 1, ctx) : this.anyValue();
      entries.push({ kv: kv(name, value), required: true });
    }
    if (entries.length === 0) {
      // No properties: a map when others are allowed (any keys, values of additionalProperties' schema).
      if (extra === false) return seq(lit("{"), ws, lit("}"));
      if (extra === undefined || extra === true) return this.anyObject();
      const value = this.convert(extra, `${path}.additionalProperties`, depth + 1, ctx);
      const member = this.g.define(`${hint}-entry`, seq(this.string(), ws, lit(":"), ws, value));
      return this.g.define(`${hint}-map`, seq(lit("{"), ws, opt(seq(member, rep(seq(ws, lit(","), ws, member), 0, null))), ws, lit("}")));
    }
    // Declared properties in order; `after[i]` follows something already written (each item after a comma),
    // `first[i]` writes the first property present from i on.
    const n = entries.length;
    const after: Expr[] = new Array(n + 1);
    after[n] = lit("");
    for (let i = n - 1; i >= 0; i--) {
      const e = entries[i] as { kv: Expr; required: boolean };
      const item = seq(ws, lit(","), ws, e.kv);
      const body = seq(e.required ? item : opt(item), after[i + 1] as Expr);
      after[i] = i === n - 1 ? body : this.g.define(`${hint}-after-${i}`, body);
    }
    let first: Expr = lit("");
    let anyRequired = false;
    for (let i = n - 1; i >= 0; i--) {
      const e = entries[i] as { kv: Expr; required: boolean };
      const withThis = seq(e.kv, after[i + 1] as Expr);
      if (e.required) {
        first = withThis;
        anyRequired = true;
      } else {
        first = this.g.define(`${hint}-from-${i}`, alt(withThis, first));
      }
    }
    // With no required property, `first` may write nothing: `{}`.
    const inner = anyRequired ? first : alt(first, lit(""));
    return this.g.define(`${hint}-object`, seq(lit("{"), ws, inner, ws, lit("}")));
  }

  /** A JSON literal (const, enum value): exactly its JSON text. */
  private literal(v: unknown, path: string): Expr {
    let text: string | undefined;
    try {
      text = JSON.stringify(v);
    } catch {
      text = undefined;
    }
    if (text === undefined) this.fail(path, "must be a JSON value");
    return lit(text);
  }

  /** A $ref: a rule of its own per target, so recursion through objects and arrays works. */
  private reference(r: unknown, path: string, depth: number, ctx: Ctx): Expr {
    if (typeof r !== "string") this.fail(path, "$ref must be a string");
    if (!r.startsWith("#")) this.fail(path, `only references within the schema (#...) are supported, not ${JSON.stringify(r)}`);
    const pointer = r.slice(1);
    if (pointer !== "" && !pointer.startsWith("/"))
      this.fail(path, `${JSON.stringify(r)} is not a JSON pointer (anchors are not supported)`);
    let target: unknown = ctx.doc;
    for (const seg of pointer.split("/").slice(1)) {
      const key = unescapePointer(seg);
      if (Array.isArray(target) && /^\d+$/.test(key)) target = target[Number(key)];
      else if (isObject(target) && key in target) target = target[key];
      else this.fail(path, `${JSON.stringify(r)} does not resolve within the schema`);
    }
    const known = (this.refRules.get(pointer) ?? []).find((x) => x.doc === ctx.doc);
    if (known) {
      // Reached again before anything was written: left recursion, which no grammar can run.
      if (ctx.unconsumed.has(known.name)) this.fail(path, `${JSON.stringify(r)} refers back to itself before any value is written`);
      return ref(known.name);
    }
    const name = this.g.reserve(`ref-${pointer.split("/").pop() || "root"}`);
    const list = this.refRules.get(pointer) ?? [];
    list.push({ doc: ctx.doc, pointer, name });
    this.refRules.set(pointer, list);
    this.refOrigins.set(name, path);
    const inner: Ctx = { ...ctx, unconsumed: new Set([...ctx.unconsumed, name]) };
    const where =
      ctx.rootPath +
      pointer
        .split("/")
        .slice(1)
        .map((p) => (/^\d+$/.test(p) ? `[${p}]` : `.${unescapePointer(p)}`))
        .join("");
    this.g.set(name, this.convert(target, where, depth + 1, inner));
    return ref(name);
  }
}

/** Keywords of one type's family (they apply only beside that type). */
const TYPE_KEYWORDS = new Set([
  "type",
  "properties",
  "required",
  "additionalProperties",
  "items",
  "prefixItems",
  "minItems",
  "maxItems",
  "minLength",
  "maxLength",
  "format",
  "minimum",
  "exclusiveMinimum",
  "enum",
  "const",
]);

/** A rule-name hint from a schema path (its last few segments). */
function pathHint(path: string): string {
  const parts = path.split(/[.[\]()]+/).filter((p) => p && p !== "properties" && p !== "schema" && p !== "json_schema");
  return parts.slice(-2).join("-") || "obj";
}

/** GBNF for one JSON value of `schema` (the whole grammar, root included). Throws SchemaError naming the path. */
export function schemaGrammar(schema: unknown, path: string, o: ConvertOptions = {}): string {
  const j = new JsonGrammar(o);
  return j.finish(j.value(schema, path), path);
}

/** GBNF for any JSON object (response_format json_object). */
export function jsonObjectGrammar(): string {
  const j = new JsonGrammar();
  return j.finish(j.anyObject(), "response_format");
}
