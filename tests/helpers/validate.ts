// A small JSON Schema validator for tests: the keywords the structured-output
// converter supports, checked independently of it (a grammar bug then shows
// up as a validation failure, not as agreement with itself).

type Schema = boolean | Record<string, unknown>;

const isObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === "object" && !Array.isArray(v);

function typeOf(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "array";
  if (typeof v === "number") return Number.isInteger(v) ? "integer" : "number";
  return typeof v;
}

function resolve(root: Schema, ref: string): Schema {
  let cur: unknown = root;
  for (const seg of ref.slice(1).split("/").slice(1))
    cur = (cur as Record<string, unknown>)[seg.replaceAll("~1", "/").replaceAll("~0", "~")];
  return cur as Schema;
}

/** Errors of `value` against `schema` (empty when valid), each with its JSON path. */
export function validate(value: unknown, schema: Schema, root: Schema = schema, path = "$"): string[] {
  if (schema === true) return [];
  if (schema === false) return [`${path}: false schema`];
  const s = schema;
  const errs: string[] = [];
  if (typeof s.$ref === "string") return validate(value, resolve(root, s.$ref), root, path);
  if (s.nullable === true && value === null) return [];
  if ("const" in s && JSON.stringify(s.const) !== JSON.stringify(value)) errs.push(`${path}: not the const`);
  if (Array.isArray(s.enum) && !s.enum.some((e) => JSON.stringify(e) === JSON.stringify(value))) errs.push(`${path}: not in enum`);
  const branches = (s.anyOf ?? s.oneOf) as Schema[] | undefined;
  if (branches && !branches.some((b) => validate(value, b, root, path).length === 0)) errs.push(`${path}: matches no branch`);
  if (Array.isArray(s.allOf)) for (const b of s.allOf as Schema[]) errs.push(...validate(value, b, root, path));
  if (s.type !== undefined) {
    const types = Array.isArray(s.type) ? s.type : [s.type];
    const t = typeOf(value);
    if (!types.includes(t) && !(t === "integer" && types.includes("number"))) errs.push(`${path}: type ${t}, want ${types.join("|")}`);
  }
  if (typeof value === "string") {
    const len = [...value].length;
    if (typeof s.minLength === "number" && len < s.minLength) errs.push(`${path}: shorter than ${s.minLength}`);
    if (typeof s.maxLength === "number" && len > s.maxLength) errs.push(`${path}: longer than ${s.maxLength}`);
    if (s.format === "date" && !/^\d{4}-\d{2}-\d{2}$/.test(value)) errs.push(`${path}: not a date`);
    if (s.format === "uuid" && !/^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$/i.test(value)) errs.push(`${path}: not a uuid`);
  }
  if (typeof value === "number") {
    if (typeof s.minimum === "number" && value < s.minimum) errs.push(`${path}: below ${s.minimum}`);
    if (typeof s.maximum === "number" && value > s.maximum) errs.push(`${path}: above ${s.maximum}`);
    if (typeof s.exclusiveMinimum === "number" && value <= s.exclusiveMinimum) errs.push(`${path}: not above ${s.exclusiveMinimum}`);
  }
  if (Array.isArray(value)) {
    if (typeof s.minItems === "number" && value.length < s.minItems) errs.push(`${path}: fewer than ${s.minItems} items`);
    if (typeof s.maxItems === "number" && value.length > s.maxItems) errs.push(`${path}: more than ${s.maxItems} items`);
    const prefix = (s.prefixItems ?? []) as Schema[];
    value.forEach((v, i) => {
      const item = i < prefix.length ? prefix[i] : (s.items as Schema | undefined);
      if (item !== undefined) errs.push(...validate(v, item, root, `${path}[${i}]`));
    });
  }
  if (isObject(value)) {
    const props = (s.properties ?? {}) as Record<string, Schema>;
    for (const r of (s.required ?? []) as string[]) if (!(r in value)) errs.push(`${path}: missing ${r}`);
    for (const [k, v] of Object.entries(value)) {
      if (k in props) errs.push(...validate(v, props[k] as Schema, root, `${path}.${k}`));
      else if (s.additionalProperties === false) errs.push(`${path}: unexpected ${k}`);
      else if (isObject(s.additionalProperties)) errs.push(...validate(v, s.additionalProperties, root, `${path}.${k}`));
    }
  }
  return errs;
}
