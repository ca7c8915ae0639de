import { expect, test } from "bun:test";
import { existsSync, mkdtempSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pruneCache } from "../../src/split/stage-cache";

test("prunes_the_oldest_cached_tensors_until_the_cache_fits_its_budget", () => {
  const dir = mkdtempSync(join(tmpdir(), "mesh-stage-cache-"));
  for (let i = 0; i < 5; i++) {
    const p = join(dir, `t${i}`);
    writeFileSync(p, Buffer.alloc(1000));
    utimesSync(p, 1000 + i, 1000 + i); // t0 oldest
  }
  expect(pruneCache(dir, 5000)).toEqual({ files: 0, bytes: 0 });
  expect(pruneCache(dir, 2500)).toEqual({ files: 3, bytes: 3000 });
  expect(["t0", "t1", "t2"].some((n) => existsSync(join(dir, n)))).toBe(false);
  expect(existsSync(join(dir, "t3")) && existsSync(join(dir, "t4"))).toBe(true);
  expect(pruneCache(join(dir, "missing"), 0)).toEqual({ files: 0, bytes: 0 });
});
