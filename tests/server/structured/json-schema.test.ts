// The JSON schema -> GBNF converter, pure: each supported feature accepts what the schema allows and
// rejects what it does not (checked with a small GBNF matcher), each refused feature is named with
// its path, and the grammar's size is bounded.
import { describe, expect, test } from "bun:test";
import { parseToolCalls } from "../../../src/server/chat";
import { ApiError } from "../../../src/server/errors";
import { CompletionLogprobs, chatLogprobs, forcedTool, responseFormatGrammar, toolCallGrammar } from "../../../src/server/structured";
import { MAX_GRAMMAR_BYTES, SchemaError, schemaGrammar } from "../../../src/server/structured/json-schema";
import { gbnfAccepts } from "../../helpers/gbnf-match";
import { validate } from "../../helpers/validate";

const P = "response_format.json_schema.schema";

/** Assert the grammar of `schema` accepts every `good` text and rejects every `bad` one; good ones also validate. */
function language(schema: unknown, good: string[], bad: string[]): void {
  const g = schemaGrammar(schema, P);
  for (const text of good) {
    expect({ text, accepted: gbnfAccepts(g, text) }).toEqual({ text, accepted: true });
    expect(validate(JSON.parse(text), schema as Record<string, unknown>)).toEqual([]);
  }
  for (const text of bad) expect({ text, accepted: gbnfAccepts(g, text) }).toEqual({ text, accepted: false });
}

/** The SchemaError a schema is refused with. */
function refusal(schema: unknown, o: { lenient?: boolean } = {}): SchemaError {
  try {
    schemaGrammar(schema, P, o);
  } catch (e) {
    if (e instanceof SchemaError) return e;
    throw e;
  }
  throw new Error("schema was accepted");
}

describe("supported schema features", () => {
  test("object_properties_required_and_no_additional_properties", () => {
    const schema = {
      type: "object",
      properties: { a: { type: "string" }, b: { type: "integer" }, c: { type: "boolean" } },
      required: ["a", "c"],
      additionalProperties: false,
    };
    language(
      schema,
      ['{"a":"x","c":true}', '{"a": "x", "b": 3, "c": false}', '{\n  "a": "",\n  "b": -12,\n  "c": true\n}'],
      ['{"a":"x"}', '{"c":true}', '{"a":"x","c":true,"d":1}', '{"a":1,"c":true}', '{"a":"x","c":true,}', '{"b":1,"a":"x","c":true}'],
    );
  });

  test("all_optional_properties_allow_any_subset_in_order", () => {
    language(
      { type: "object", properties: { x: { type: "null" }, y: { type: "null" } }, additionalProperties: false },
      ["{}", '{"x":null}', '{"y":null}', '{"x":null,"y":null}'],
      ['{"y":null,"x":null}', '{,"y":null}', '{"x":null,}'],
    );
  });

  test("a_map_from_additional_properties_schema", () => {
    language({ type: "object", additionalProperties: { type: "integer" } }, ["{}", '{"k":1,"j":2}'], ['{"k":"v"}']);
  });

  test("required_but_undeclared_property_is_written", () => {
    language(
      { type: "object", properties: { a: { type: "integer" } }, required: ["z"] },
      ['{"z":[1,"two",null]}', '{"a":1,"z":{}}'],
      ["{}"],
    );
  });

  test("arrays_with_items_min_and_max", () => {
    language(
      { type: "array", items: { type: "integer" }, minItems: 1, maxItems: 3 },
      ["[1]", "[1, 2, 3]", "[ 0 ]"],
      ["[]", "[1,2,3,4]", '["a"]', "[1,]"],
    );
    language({ type: "array", items: { type: "number" } }, ["[]", "[1.5, -2e3, 0]"], ["[01]", "[1.]"]);
    language({ type: "array", prefixItems: [{ type: "string" }, { type: "boolean" }] }, ['["a", true]'], ['["a"]', "[true, true]"]);
  });

  test("strings_with_length_enum_const_and_formats", () => {
    language({ type: "string", minLength: 2, maxLength: 3 }, ['"ab"', '"abc"', '"a\\n"', '"é€😀"'], ['"a"', '"abcd"', '"a\nb"']);
    language({ enum: ["red", "green", 3, null] }, ['"red"', '"green"', "3", "null"], ['"blue"', '"Red"', "4"]);
    language({ const: { k: [1, true] } }, ['{"k":[1,true]}'], ['{"k":[1,false]}', '{"k": [1,true]}']);
    language({ type: "string", format: "date" }, ['"2024-02-29"'], ['"2024-2-29"', '"2024-13-01"']);
    language(
      { type: "string", format: "date-time" },
      ['"2024-02-29T23:59:60Z"', '"2024-02-29T01:02:03.5+02:00"'],
      ['"2024-02-29 01:02:03Z"'],
    );
    language({ type: "string", format: "uuid" }, ['"123e4567-e89b-12d3-a456-426614174000"'], ['"123e4567e89b12d3a456426614174000"']);
    language({ type: "string", format: "time" }, ['"12:30:00Z"'], ['"24:00:00Z"']);
  });

  test("numbers_integers_and_their_supported_bounds", () => {
    language({ type: "integer" }, ["0", "-7", "1234567890123456"], ["1.5", "01", "+1", "12345678901234567"]);
    language({ type: "integer", minimum: 0 }, ["0", "42"], ["-1"]);
    language({ type: "integer", minimum: 1 }, ["1", "42"], ["0", "-1"]);
    language({ type: "integer", exclusiveMinimum: 0 }, ["1"], ["0"]);
    language({ type: "integer", minimum: -2, maximum: 2 }, ["-2", "0", "2"], ["3", "-3"]);
    language({ type: "number", minimum: 0 }, ["0", "0.25", "3e-2"], ["-0.5"]);
    language({ type: "number" }, ["-0.5", "1E+10"], ["NaN", ".5"]);
  });

  test("boolean_null_nullable_and_type_arrays", () => {
    language({ type: "boolean" }, ["true", "false"], ["True", "1"]);
    language({ type: ["string", "null"] }, ['"a"', "null"], ["1"]);
    language({ type: "integer", nullable: true }, ["1", "null"], ['"1"']);
  });

  test("any_of_one_of_and_all_of_one", () => {
    language({ anyOf: [{ type: "integer" }, { type: "string", maxLength: 1 }] }, ["5", '"x"'], ['"xy"', "true"]);
    language({ oneOf: [{ const: 1 }, { const: 2 }] }, ["1", "2"], ["3"]);
    language({ allOf: [{ type: "boolean" }] }, ["true"], ["1"]);
  });

  test("refs_to_defs_definitions_and_recursive_refs", () => {
    language(
      {
        $defs: { p: { type: "object", properties: { n: { type: "integer" } }, required: ["n"], additionalProperties: false } },
        $ref: "#/$defs/p",
      },
      ['{"n":1}'],
      ["{}"],
    );
    language(
      { definitions: { s: { type: "string", maxLength: 2 } }, type: "array", items: { $ref: "#/definitions/s" } },
      ['["ab"]'],
      ['["abc"]'],
    );
    const tree = {
      type: "object",
      properties: { v: { type: "integer" }, kids: { type: "array", items: { $ref: "#" } } },
      required: ["v"],
      additionalProperties: false,
    };
    language(tree, ['{"v":1}', '{"v":1,"kids":[{"v":2,"kids":[{"v":3}]},{"v":4}]}'], ['{"v":1,"kids":[{}]}']);
  });

  test("true_empty_and_annotated_schemas_allow_any_value", () => {
    language(true, ['{"a":[1,{"b":null}]}', '"s"', "1"], ["{a:1}"]);
    language({ title: "T", description: "anything" }, ["[]", "false"], ["nope"]);
  });
});

describe("refused schema features name the feature and its path", () => {
  const cases: [string, unknown, string][] = [
    ["pattern", { type: "object", properties: { x: { type: "string", pattern: "^a" } } }, `${P}.properties.x.pattern`],
    ["format", { type: "string", format: "email" }, `${P}.format`],
    ["uniqueItems", { type: "array", uniqueItems: true }, `${P}.uniqueItems`],
    ["maximum alone", { type: "integer", maximum: 10 }, `${P}.maximum`],
    ["number exclusiveMinimum", { type: "number", exclusiveMinimum: 0 }, `${P}.exclusiveMinimum`],
    ["not", { not: { type: "string" } }, `${P}.not`],
    ["allOf of two", { allOf: [{ type: "object" }, { required: ["a"] }] }, `${P}.allOf`],
    ["type beside anyOf", { type: "object", anyOf: [{ required: ["a"] }] }, `${P}.type`],
    ["patternProperties", { type: "object", patternProperties: { "^x": {} } }, `${P}.patternProperties`],
    ["maxLength too large", { type: "string", maxLength: 100000 }, `${P}.maxLength`],
    ["external $ref", { $ref: "https://example.com/s.json" }, `${P}.$ref`],
    ["unresolved $ref", { $ref: "#/$defs/missing" }, `${P}.$ref`],
    ["left-recursive $ref", { $defs: { a: { $ref: "#/$defs/a" } }, $ref: "#/$defs/a" }, `${P}.$defs.a.$ref`],
    ["recursion without a way out", { type: "object", properties: { n: { $ref: "#" } }, required: ["n"] }, `${P}.properties.n.$ref`],
    ["unknown type", { type: "decimal" }, `${P}.type`],
    ["false schema", { type: "object", properties: { x: false }, required: ["x"] }, `${P}.properties.x`],
    ["deeply nested", nest(80), `${P}${".items".repeat(65)}`],
  ];
  for (const [name, schema, path] of cases) {
    test(`refuses_${name.replaceAll(" ", "_")}`, () => {
      const e = refusal(schema);
      expect(e.path).toBe(path);
      expect(e.message.startsWith(path)).toBe(true);
    });
  }

  test("lenient_conversion_ignores_what_it_cannot_enforce", () => {
    const g = schemaGrammar(
      { type: "object", properties: { x: { type: "string", pattern: "^a", format: "email" } }, required: ["x"] },
      "p",
      {
        lenient: true,
      },
    );
    expect(gbnfAccepts(g, '{"x":"zzz"}')).toBe(true);
    expect(gbnfAccepts(g, "{}")).toBe(false);
  });

  test("grammar_size_is_bounded", () => {
    // Many distinct long enums: a grammar past the bound is refused, naming the schema.
    const properties: Record<string, unknown> = {};
    for (let i = 0; i < 400; i++) properties[`p${i}`] = { enum: [`${"v".repeat(300)}${i}`, `w${i}`] };
    const e = refusal({ type: "object", properties });
    expect(e.path).toBe(P);
    expect(e.message).toContain(`${MAX_GRAMMAR_BYTES} bytes`);
  });
});

function nest(depth: number): unknown {
  let s: unknown = { type: "integer" };
  for (let i = 0; i < depth; i++) s = { type: "array", items: s };
  return s;
}

describe("response_format", () => {
  const status = (f: () => unknown) => {
    try {
      f();
    } catch (e) {
      if (e instanceof ApiError) return { status: e.status, param: e.param };
      throw e;
    }
    return null;
  };

  test("text_and_absent_need_no_grammar_json_object_any_object", () => {
    expect(responseFormatGrammar(undefined)).toBeNull();
    expect(responseFormatGrammar({ type: "text" })).toBeNull();
    const g = responseFormatGrammar({ type: "json_object" }) as string;
    expect(gbnfAccepts(g, '{"a": [1, {"b": "c"}]}')).toBe(true);
    expect(gbnfAccepts(g, "[1]")).toBe(false);
  });

  test("json_schema_is_converted_and_refusals_name_the_field", () => {
    const g = responseFormatGrammar({
      type: "json_schema",
      json_schema: { name: "x", schema: { type: "integer" }, strict: true },
    }) as string;
    expect(gbnfAccepts(g, "12")).toBe(true);
    expect(status(() => responseFormatGrammar({ type: "yaml" }))).toEqual({ status: 400, param: "response_format.type" });
    expect(status(() => responseFormatGrammar("json"))).toEqual({ status: 400, param: "response_format" });
    expect(status(() => responseFormatGrammar({ type: "json_schema" }))).toEqual({ status: 400, param: "response_format.json_schema" });
    expect(status(() => responseFormatGrammar({ type: "json_schema", json_schema: { name: "a b", schema: {} } }))).toEqual({
      status: 400,
      param: "response_format.json_schema.name",
    });
    expect(
      status(() => responseFormatGrammar({ type: "json_schema", json_schema: { name: "a", schema: { type: "string", pattern: "x" } } })),
    ).toEqual({ status: 400, param: "response_format.json_schema.schema.pattern" });
  });

  test("logprobs_fields", () => {
    expect(chatLogprobs(true, 3)).toBe(3);
    expect(chatLogprobs(true, undefined)).toBe(0);
    expect(chatLogprobs(false, null)).toBeUndefined();
    expect(status(() => chatLogprobs(undefined, 2))).toEqual({ status: 400, param: "top_logprobs" });
  });
});

describe("forced tool calls", () => {
  const tools = [
    {
      function: {
        name: "get_weather",
        parameters: { type: "object", properties: { city: { type: "string" }, days: { type: "integer" } }, required: ["city"] },
      },
    },
    { function: { name: "now" } },
  ];

  test("only_required_or_a_named_function_forces_a_call", () => {
    expect(forcedTool("auto")).toBeNull();
    expect(forcedTool("none")).toBeNull();
    expect(forcedTool("required")).toBe("*");
    expect(forcedTool({ type: "function", function: { name: "now" } })).toBe("now");
    expect(toolCallGrammar(tools, "auto", "hermes")).toBeNull();
  });

  test("hermes_call_grammar_matches_the_parsers_format", () => {
    const g = toolCallGrammar(tools, "required", "hermes") as string;
    expect(gbnfAccepts(g, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')).toBe(true);
    expect(gbnfAccepts(g, '<tool_call>{"name": "now", "arguments": {"anything": [1]}}</tool_call>')).toBe(true);
    expect(gbnfAccepts(g, '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>')).toBe(false);
    expect(gbnfAccepts(g, '<tool_call>{"name": "other", "arguments": {}}</tool_call>')).toBe(false);
    const named = toolCallGrammar(tools, { type: "function", function: { name: "now" } }, "hermes") as string;
    expect(gbnfAccepts(named, '<tool_call>{"name": "get_weather", "arguments": {"city": "x"}}</tool_call>')).toBe(false);
  });

  test("llama3_call_grammar_writes_parameters", () => {
    const g = toolCallGrammar(tools, "required", "llama3") as string;
    expect(gbnfAccepts(g, '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 3}}')).toBe(true);
    expect(gbnfAccepts(g, '{"name": "get_weather", "arguments": {"city": "Oslo"}}')).toBe(false);
  });

  test("a_tool_schema_that_cannot_be_followed_leaves_its_arguments_free", () => {
    const broken = [{ function: { name: "f", parameters: { $ref: "#/nowhere" } } }];
    const g = toolCallGrammar(broken, "required", "hermes") as string;
    expect(gbnfAccepts(g, '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')).toBe(true);
  });
});

test("completion_logprobs_legacy_shape_and_offsets", () => {
  const lp = new CompletionLogprobs("Hi");
  const tok = (s: string, logprob: number) => ({ token: 1, bytes: [...Buffer.from(s)], logprob });
  const a = lp.of([{ ...tok(" there", -0.5), top: [tok(" there", -0.5), tok(" you", -1)] }]);
  const b = lp.of([{ ...tok("!", -0.1), top: [] }]);
  expect(a).toEqual({ tokens: [" there"], token_logprobs: [-0.5], top_logprobs: [{ " there": -0.5, " you": -1 }], text_offset: [2] });
  expect(b.text_offset).toEqual([8]);
});

test("what_a_forced_call_grammar_writes_the_chat_parser_reads_as_a_call", () => {
  const tools = [{ function: { name: "f", parameters: { type: "object", properties: { a: { type: "integer" } }, required: ["a"] } } }];
  for (const [syntax, text] of [
    ["hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'],
    ["llama3", '{"name": "f", "parameters": {"a": 1}}'],
  ] as const) {
    expect(gbnfAccepts(toolCallGrammar(tools, "required", syntax) as string, text)).toBe(true);
    const parsed = parseToolCalls(text);
    expect(parsed.toolCalls.map((c) => [c.name, JSON.parse(c.arguments)])).toEqual([["f", { a: 1 }]]);
  }
});
