import { expect, test } from "bun:test";
import { commonPrefix } from "../../src/engine/scheduler";

test("common_prefix_counts_matching_leading_tokens", () => {
  expect(commonPrefix([1, 2, 3], [1, 2, 4])).toBe(2);
  expect(commonPrefix([], [1])).toBe(0);
  expect(commonPrefix([1, 2], [1, 2, 3])).toBe(2);
  expect(commonPrefix([5], [6])).toBe(0);
});
