// A tiny GBNF reader and matcher for tests: enough of the syntax our
// converter writes (literals, character classes, rule references, groups,
// alternatives, ?, *, +, {m}, {m,}, {m,n}) to ask whether a grammar accepts a
// text, without llama.cpp. Memoised per (rule, position); our grammars have no
// left recursion.

type Node =
  | { k: "lit"; s: string }
  | { k: "cls"; neg: boolean; ranges: [number, number][] }
  | { k: "ref"; name: string }
  | { k: "seq"; xs: Node[] }
  | { k: "alt"; xs: Node[] }
  | { k: "rep"; x: Node; min: number; max: number };

function parseEscape(src: string, i: number): [string, number] {
  const c = src[i + 1] as string;
  if (c === "x") return [String.fromCodePoint(Number.parseInt(src.slice(i + 2, i + 4), 16)), i + 4];
  if (c === "u") return [String.fromCodePoint(Number.parseInt(src.slice(i + 2, i + 6), 16)), i + 6];
  const map: Record<string, string> = { n: "\n", r: "\r", t: "\t" };
  return [map[c] ?? c, i + 2];
}

/** Parse GBNF text into rules. */
export function parseGbnf(text: string): Map<string, Node> {
  const rules = new Map<string, Node>();
  let src = "";
  let i = 0;
  const ws = () => {
    while (i < src.length && /[ \t]/.test(src[i] as string)) i++;
  };
  const alternatives = (): Node => {
    const xs = [sequence()];
    ws();
    while (src[i] === "|") {
      i++;
      xs.push(sequence());
      ws();
    }
    return xs.length === 1 ? (xs[0] as Node) : { k: "alt", xs };
  };
  const sequence = (): Node => {
    const xs: Node[] = [];
    for (;;) {
      ws();
      const c = src[i];
      if (c === undefined || c === "|" || c === ")") break;
      let item: Node;
      if (c === '"') {
        i++;
        let s = "";
        while (src[i] !== '"') {
          if (src[i] === "\\") {
            const [ch, j] = parseEscape(src, i);
            s += ch;
            i = j;
          } else {
            const cp = src.codePointAt(i) as number;
            s += String.fromCodePoint(cp);
            i += cp > 0xffff ? 2 : 1;
          }
        }
        i++;
        item = { k: "lit", s };
      } else if (c === "[") {
        i++;
        const neg = src[i] === "^";
        if (neg) i++;
        const ranges: [number, number][] = [];
        while (src[i] !== "]") {
          let lo: string;
          if (src[i] === "\\") [lo, i] = parseEscape(src, i);
          else lo = src[i++] as string;
          let hi = lo;
          if (src[i] === "-" && src[i + 1] !== "]") {
            i++;
            if (src[i] === "\\") [hi, i] = parseEscape(src, i);
            else hi = src[i++] as string;
          }
          ranges.push([lo.codePointAt(0) as number, hi.codePointAt(0) as number]);
        }
        i++;
        item = { k: "cls", neg, ranges };
      } else if (c === "(") {
        i++;
        item = alternatives();
        ws();
        i++; // )
      } else {
        const m = /^[a-zA-Z0-9-]+/.exec(src.slice(i));
        if (!m) throw new Error(`bad GBNF at ${src.slice(i, i + 20)}`);
        i += m[0].length;
        item = { k: "ref", name: m[0] };
      }
      // Postfix operators.
      for (;;) {
        const p = src[i];
        if (p === "?") item = { k: "rep", x: item, min: 0, max: 1 };
        else if (p === "*") item = { k: "rep", x: item, min: 0, max: Number.POSITIVE_INFINITY };
        else if (p === "+") item = { k: "rep", x: item, min: 1, max: Number.POSITIVE_INFINITY };
        else if (p === "{") {
          const m = /^\{(\d+)(,(\d*))?\}/.exec(src.slice(i)) as RegExpExecArray;
          const min = Number(m[1]);
          const max = m[2] === undefined ? min : m[3] === "" ? Number.POSITIVE_INFINITY : Number(m[3]);
          item = { k: "rep", x: item, min, max };
          i += m[0].length - 1;
        } else break;
        i++;
      }
      xs.push(item);
    }
    return xs.length === 1 ? (xs[0] as Node) : { k: "seq", xs };
  };
  for (const line of text.split("\n")) {
    if (line.trim() === "") continue;
    const m = /^([a-zA-Z0-9-]+) ::= ?(.*)$/.exec(line);
    if (!m) throw new Error(`bad rule line: ${line}`);
    src = m[2] as string;
    i = 0;
    rules.set(m[1] as string, alternatives());
  }
  return rules;
}

/** Whether the grammar (rule `root`) matches the whole of `text`. */
export function gbnfAccepts(grammar: string, text: string): boolean {
  const rules = parseGbnf(grammar);
  const chars = [...text];
  const memo = new Map<string, Set<number>>();
  const ends = (n: Node, pos: number): Set<number> => {
    switch (n.k) {
      case "lit": {
        const cs = [...n.s];
        for (let j = 0; j < cs.length; j++) if (chars[pos + j] !== cs[j]) return new Set();
        return new Set([pos + cs.length]);
      }
      case "cls": {
        const ch = chars[pos];
        if (ch === undefined) return new Set();
        const cp = ch.codePointAt(0) as number;
        const hit = n.ranges.some(([lo, hi]) => cp >= lo && cp <= hi);
        return hit !== n.neg ? new Set([pos + 1]) : new Set();
      }
      case "ref": {
        const key = `${n.name}@${pos}`;
        const known = memo.get(key);
        if (known) return known;
        const body = rules.get(n.name);
        if (!body) throw new Error(`undefined rule ${n.name}`);
        memo.set(key, new Set());
        const r = ends(body, pos);
        memo.set(key, r);
        return r;
      }
      case "seq": {
        let at = new Set([pos]);
        for (const x of n.xs) {
          const next = new Set<number>();
          for (const p of at) for (const e of ends(x, p)) next.add(e);
          at = next;
          if (at.size === 0) break;
        }
        return at;
      }
      case "alt": {
        const out = new Set<number>();
        for (const x of n.xs) for (const e of ends(x, pos)) out.add(e);
        return out;
      }
      case "rep": {
        const out = new Set<number>();
        let at = new Set([pos]);
        if (n.min === 0) out.add(pos);
        for (let count = 1; count <= n.max && at.size > 0; count++) {
          const next = new Set<number>();
          for (const p of at) for (const e of ends(n.x, p)) if (e > p || count <= n.min) next.add(e);
          at = next;
          if (count >= n.min) for (const e of at) out.add(e);
          if (count > chars.length + n.min) break;
        }
        return out;
      }
    }
  };
  return ends({ k: "ref", name: "root" }, 0).has(chars.length);
}
