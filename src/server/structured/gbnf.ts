// A small GBNF builder: expressions as data, rules by name, and the text
// llama.cpp's grammar parser reads. Keeping the grammar as data (not strings)
// lets us check it before the engine sees it: its size, and whether every rule
// can finish (a recursive rule with no way out would constrain the model to
// generate forever).
//
// GBNF facts this relies on (llama.cpp's parser): rule names are [a-zA-Z0-9-]+;
// `x{m,n}` expands into n rules, and a bound over 2000 silently becomes
// unbounded, so bounds stay at MAX_REPEAT; repeating a group that itself holds
// repetitions multiplies them, so a repeated expression is always a literal,
// a character class or a rule reference (anything else is hoisted into a rule).

/** A GBNF expression. */
export type Expr =
  /** Literal text. */
  | { k: "lit"; s: string }
  /** A character class, as GBNF text (e.g. `[0-9]`). */
  | { k: "cls"; s: string }
  | { k: "ref"; name: string }
  | { k: "seq"; xs: Expr[] }
  | { k: "alt"; xs: Expr[] }
  /** x repeated min..max times (max null: unbounded). */
  | { k: "rep"; x: Expr; min: number; max: number | null };

/** Largest repetition bound we write (llama.cpp treats bounds over 2000 as unbounded). */
export const MAX_REPEAT = 1000;

export const lit = (s: string): Expr => ({ k: "lit", s });
export const cls = (s: string): Expr => ({ k: "cls", s });
export const ref = (name: string): Expr => ({ k: "ref", name });
export const rep = (x: Expr, min: number, max: number | null): Expr => ({ k: "rep", x, min, max });
export const opt = (x: Expr): Expr => rep(x, 0, 1);

/** A sequence, flattened; one item stands for itself. */
export function seq(...xs: Expr[]): Expr {
  const flat: Expr[] = [];
  for (const x of xs) {
    if (x.k === "seq") flat.push(...x.xs);
    else if (!(x.k === "lit" && x.s === "")) flat.push(x);
  }
  // Adjacent literals read better as one.
  const merged: Expr[] = [];
  for (const x of flat) {
    const last = merged[merged.length - 1];
    if (last?.k === "lit" && x.k === "lit") merged[merged.length - 1] = lit(last.s + x.s);
    else merged.push(x);
  }
  if (merged.length === 0) return lit("");
  return merged.length === 1 ? (merged[0] as Expr) : { k: "seq", xs: merged };
}

/** Alternatives, flattened and without duplicates; one stands for itself. */
export function alt(...xs: Expr[]): Expr {
  const flat: Expr[] = [];
  const seen = new Set<string>();
  for (const x of xs.flatMap((y) => (y.k === "alt" ? y.xs : [y]))) {
    const key = JSON.stringify(x);
    if (seen.has(key)) continue;
    seen.add(key);
    flat.push(x);
  }
  return flat.length === 1 ? (flat[0] as Expr) : { k: "alt", xs: flat };
}

/** A GBNF string literal for text (quotes, backslashes and control characters escaped). */
export function gbnfLiteral(s: string): string {
  let out = '"';
  for (const ch of s) {
    const c = ch.codePointAt(0) as number;
    if (ch === '"') out += '\\"';
    else if (ch === "\\") out += "\\\\";
    else if (ch === "\n") out += "\\n";
    else if (ch === "\r") out += "\\r";
    else if (ch === "\t") out += "\\t";
    else if (c < 0x20 || c === 0x7f) out += `\\x${c.toString(16).padStart(2, "0")}`;
    else out += ch;
  }
  return `${out}"`;
}

/** Rules by name; `define` reuses the name of an identical rule. */
export class Grammar {
  private readonly rules = new Map<string, Expr>();
  private readonly byBody = new Map<string, string>();
  /** Rules reserved by name before their body is known (recursive references). */
  private readonly pending = new Set<string>();

  /** A fresh rule name from a hint (sanitised to GBNF's alphabet). */
  name(hint: string): string {
    const base =
      hint
        .replace(/[^a-zA-Z0-9-]+/g, "-")
        .replace(/-+/g, "-")
        .replace(/^-|-$/g, "")
        .slice(0, 48) || "r";
    let n = base;
    for (let i = 1; this.rules.has(n) || this.pending.has(n) || n === "root"; i++) n = `${base}-${i}`;
    return n;
  }

  /** Reserve a name whose body comes later (set() fills it). */
  reserve(hint: string): string {
    const n = this.name(hint);
    this.pending.add(n);
    return n;
  }

  /** Give a reserved (or new) name its body. */
  set(name: string, body: Expr): void {
    this.pending.delete(name);
    this.rules.set(name, body);
  }

  /** A rule for body (an existing one with the same body when there is one); returns a reference to it. */
  define(hint: string, body: Expr): Expr {
    if (body.k === "ref") return body;
    const key = JSON.stringify(body);
    const known = this.byBody.get(key);
    if (known) return ref(known);
    const n = this.name(hint);
    this.rules.set(n, body);
    this.byBody.set(key, n);
    return ref(n);
  }

  has(name: string): boolean {
    return this.rules.has(name);
  }

  /**
   * Rules that cannot derive any finite text: each is recursive without a way
   * out (directly or through others). Empty when every rule can finish.
   */
  unfinishable(root: Expr): string[] {
    const done = new Set<string>();
    const finishes = (x: Expr): boolean => {
      switch (x.k) {
        case "lit":
        case "cls":
          return true;
        case "ref":
          return done.has(x.name);
        case "seq":
          return x.xs.every(finishes);
        case "alt":
          return x.xs.some(finishes);
        case "rep":
          return x.min === 0 || finishes(x.x);
      }
    };
    for (let changed = true; changed; ) {
      changed = false;
      for (const [n, body] of this.rules) {
        if (!done.has(n) && finishes(body)) {
          done.add(n);
          changed = true;
        }
      }
    }
    const stuck = [...this.rules.keys()].filter((n) => !done.has(n));
    return finishes(root) ? stuck : [...stuck, "root"];
  }

  /** The grammar text: `root ::= ...` first, then every rule reachable from it. */
  text(root: Expr): string {
    const lines: string[] = [];
    const hoisted = new Map<string, string>();
    const reachable = new Set<string>();
    const order: string[] = [];
    const visit = (x: Expr) => {
      if (x.k === "ref") {
        if (reachable.has(x.name)) return;
        reachable.add(x.name);
        order.push(x.name);
        const body = this.rules.get(x.name);
        if (body) visit(body);
      } else if (x.k === "seq" || x.k === "alt") x.xs.forEach(visit);
      else if (x.k === "rep") visit(x.x);
    };
    visit(root);
    // A repeated expression must be atomic: hoist composite ones into rules of their own.
    const atom = (x: Expr): string => {
      if (x.k === "lit" || x.k === "cls" || x.k === "ref") return show(x, true);
      const key = JSON.stringify(x);
      let n = hoisted.get(key);
      if (!n) {
        n = this.name("rep");
        this.pending.add(n);
        hoisted.set(key, n);
        lines.push(`${n} ::= ${show(x, false)}`);
      }
      return n;
    };
    const show = (x: Expr, nested: boolean): string => {
      switch (x.k) {
        case "lit":
          return gbnfLiteral(x.s);
        case "cls":
          return x.s;
        case "ref":
          return x.name;
        case "seq":
          return x.xs.map((y) => show(y, true)).join(" ");
        case "alt": {
          const s = x.xs.map((y) => show(y, false)).join(" | ");
          return nested ? `(${s})` : s;
        }
        case "rep": {
          const a = atom(x.x);
          if (x.min === 0 && x.max === 1) return `${a}?`;
          if (x.min === 0 && x.max === null) return `${a}*`;
          if (x.min === 1 && x.max === null) return `${a}+`;
          if (x.max === x.min) return `${a}{${x.min}}`;
          return `${a}{${x.min},${x.max ?? ""}}`;
        }
      }
    };
    const head = `root ::= ${show(root, false)}`;
    const body = order.map((n) => `${n} ::= ${show(this.rules.get(n) ?? lit(""), false)}`);
    for (const n of hoisted.values()) this.pending.delete(n);
    return [head, ...body, ...lines].join("\n");
  }
}
