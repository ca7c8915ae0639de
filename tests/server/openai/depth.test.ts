import { describe, expect, test } from "bun:test";
import { tooDeep } from "../../../src/server/openai/depth";

describe("tooDeep", () => {
  test("names_the_path_of_the_first_value_past_the_limit", () => {
    expect(tooDeep({ a: [{ b: { c: 1 } }] }, "tools", 3)).toBe("tools.a[0].b");
    expect(tooDeep({ a: [{ b: 1 }] }, "tools", 3)).toBeNull();
  });

  test("scalars_and_null_are_never_too_deep", () => {
    expect(tooDeep(null, "x", 0)).toBeNull();
    expect(tooDeep("s", "x", 0)).toBeNull();
    expect(tooDeep(undefined, "x", 0)).toBeNull();
  });

  test("checking_a_hundred_thousand_levels_does_not_overflow_the_stack", () => {
    const v = JSON.parse(`${"[".repeat(100_000)}${"]".repeat(100_000)}`);
    expect(tooDeep(v, "messages")).toBe(`messages${"[0]".repeat(64)}`);
  });
});
