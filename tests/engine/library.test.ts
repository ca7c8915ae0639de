import { afterEach, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { findNativeLib, nativeLibName } from "../../src/engine/library";

const saved = process.env.MESH_NATIVE_LIB;
afterEach(() => {
  if (saved === undefined) delete process.env.MESH_NATIVE_LIB;
  else process.env.MESH_NATIVE_LIB = saved;
});

function builds(variants: string[]): { dir: string; at: (v: string) => string } {
  const dir = mkdtempSync(join(tmpdir(), "mesh-lib-"));
  for (const v of variants) {
    mkdirSync(join(dir, v));
    writeFileSync(join(dir, v, nativeLibName()), "");
  }
  return { dir, at: (v) => join(dir, v) };
}

test("a_gpu_build_is_found_before_the_cpu_build_that_npm_start_always_makes", () => {
  delete process.env.MESH_NATIVE_LIB;
  const b = builds(["cpu", "cuda"]);
  try {
    expect(findNativeLib(b.at)).toBe(join(b.dir, "cuda", nativeLibName()));
    rmSync(join(b.dir, "cuda"), { recursive: true });
    expect(findNativeLib(b.at)).toBe(join(b.dir, "cpu", nativeLibName()));
    rmSync(join(b.dir, "cpu"), { recursive: true });
    expect(findNativeLib(b.at)).toBeNull();
  } finally {
    rmSync(b.dir, { recursive: true, force: true });
  }
});

test("mesh_native_lib_overrides_the_search_and_a_missing_file_is_not_found", () => {
  const b = builds(["cpu"]);
  try {
    process.env.MESH_NATIVE_LIB = join(b.dir, "cpu", nativeLibName());
    expect(findNativeLib(() => "/nowhere")).toBe(join(b.dir, "cpu", nativeLibName()));
    process.env.MESH_NATIVE_LIB = join(b.dir, "missing.so");
    expect(findNativeLib(b.at)).toBeNull();
  } finally {
    rmSync(b.dir, { recursive: true, force: true });
  }
});
