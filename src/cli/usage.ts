import { type AttnKernel, type PlainAttn, parseAttnKernel, parsePlainAttn } from "../engine/attention";
// Bad input on the command line: one line on stderr, exit code 2.

/** A command-line mistake; the entry point prints its message and exits 2. */
export class UsageError extends Error {
  readonly code = "usage";
}

/** Parse an integer option within bounds, or throw a UsageError naming the flag. */
export function intOption(flag: string, min: number, max = Number.MAX_SAFE_INTEGER): (v: string) => number {
  return (v: string) => {
    const n = Number(v);
    if (!/^-?\d+$/.test(v.trim()) || !Number.isSafeInteger(n) || n < min || n > max) {
      throw new UsageError(`${flag} must be a whole number from ${min} to ${max === Number.MAX_SAFE_INTEGER ? "any" : max}, got '${v}'`);
    }
    return n;
  };
}

/** Commander parser for --plain-attn: "MIN:MAX" or "off" (null). */
export function plainAttnOption(v: string): PlainAttn | null {
  const r = parsePlainAttn(v.trim());
  if (typeof r === "string") throw new UsageError(`--plain-attn: ${r}`);
  return r;
}

/** Commander parser for --attn-kernel: mesh or ggml. */
export function attnKernelOption(v: string): AttnKernel {
  const r = parseAttnKernel(v.trim());
  if (typeof r === "object") throw new UsageError(`--attn-kernel: ${r.error}`);
  return r;
}

/** Commander parser for an on/off switch such as --idle-restore; anything else names the flag. */
export function onOffOption(flag: string): (v: string) => boolean {
  return (v: string) => {
    const t = v.trim().toLowerCase();
    if (t === "on") return true;
    if (t === "off") return false;
    throw new UsageError(`${flag} must be on or off, got '${v}'`);
  };
}
