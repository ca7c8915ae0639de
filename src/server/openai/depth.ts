// Limits how deeply a request's free-form JSON (tool schemas, tool_choice,
// extra message fields) may nest: the chat template walks it recursively
// (tojson, loops), and a few thousand levels would overflow the stack and
// surface as a 500 instead of a 400 naming the field.

/** Deepest nesting of objects/arrays a request field may have; real JSON schemas stay far below. */
export const MAX_JSON_DEPTH = 64;

/**
 * The path (e.g. `tools[0].function.parameters.properties.a`) of the first
 * value nested deeper than `max` levels below `root`, or null. Iterative, so
 * checking never recurses itself.
 */
export function tooDeep(value: unknown, root: string, max = MAX_JSON_DEPTH): string | null {
  const stack: Array<{ v: unknown; path: string; depth: number }> = [{ v: value, path: root, depth: 0 }];
  while (stack.length > 0) {
    const { v, path, depth } = stack.pop() as { v: unknown; path: string; depth: number };
    if (v === null || typeof v !== "object") continue;
    if (depth >= max) return path;
    if (Array.isArray(v)) {
      for (let i = v.length - 1; i >= 0; i--) stack.push({ v: v[i], path: `${path}[${i}]`, depth: depth + 1 });
    } else {
      for (const [k, child] of Object.entries(v)) stack.push({ v: child, path: `${path}.${k}`, depth: depth + 1 });
    }
  }
  return null;
}
