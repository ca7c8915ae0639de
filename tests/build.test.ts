// build.ts: what decides a rebuild, the pin check, the command line, and
// that the library it made loads with nothing but the C runtime.
import { expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  buildDirName,
  buildInfoOf,
  cmakeFlags,
  executableName,
  integrityMismatch,
  type NativeOptions,
  parseArgs,
  readPlatformAddons,
  readPrebuilt,
  stampOf,
} from "../build";
import { findNativeLib } from "../src/engine/library";

const cpu: NativeOptions = { variant: "cpu", portable: false, withLlamaServer: false, jobs: 2 };

test("the_build_stamp_changes_with_the_shim_the_pin_and_the_variant_and_only_with_them", () => {
  const vendor = mkdtempSync(join(tmpdir(), "mesh-vendor-"));
  try {
    for (const f of ["pin.json", "CMakeLists.txt", "shim"])
      cpSync(join(import.meta.dir, "..", "vendor", "llama.cpp", f), join(vendor, f), { recursive: true });
    const base = stampOf(cpu, vendor);
    expect(stampOf({ ...cpu, jobs: 8, withLlamaServer: true }, vendor)).toBe(base);
    expect(stampOf({ ...cpu, variant: "cuda" }, vendor)).not.toBe(base);
    expect(stampOf({ ...cpu, portable: true }, vendor)).not.toBe(base);
    expect(stampOf({ ...cpu, target: "linux-arm64" }, vendor)).not.toBe(base);
    expect(stampOf({ ...cpu, target: `${process.platform}-${process.arch}` }, vendor)).toBe(base);
    // A prebuilt backend ships beside the CPU library: the library itself is the same build.
    expect(stampOf({ ...cpu, prebuilt: "vulkan" }, vendor)).toBe(base);
    writeFileSync(join(vendor, "shim", "mesh_shim.c"), "/* changed */", { flag: "a" });
    const shimChanged = stampOf(cpu, vendor);
    expect(shimChanged).not.toBe(base);
    writeFileSync(join(vendor, "shim", "mesh_attn.cpp"), "/* changed */", { flag: "a" });
    const attnChanged = stampOf(cpu, vendor);
    expect(attnChanged).not.toBe(shimChanged);
    writeFileSync(join(vendor, "pin.json"), " ", { flag: "a" });
    expect(stampOf(cpu, vendor)).not.toBe(attnChanged);
  } finally {
    rmSync(vendor, { recursive: true, force: true });
  }
});

test("a_tarball_that_does_not_match_the_pinned_integrity_is_refused", () => {
  const data = new TextEncoder().encode("llama.cpp source");
  const integrity = `sha512-${new Bun.CryptoHasher("sha512").update(data).digest("base64")}`;
  expect(integrityMismatch(data, integrity)).toBeNull();
  const other = integrityMismatch(new TextEncoder().encode("tampered"), integrity);
  expect(other).toStartWith("sha512-");
  expect(other).not.toBe(integrity);
});

test("a_bad_build_argument_is_one_line_and_exit_2", () => {
  for (const args of [
    ["--bogus"],
    ["--jobs", "0"],
    ["--cuda-arch", "sm 86!"],
    ["--target", "windows-x64"],
    ["compile", "--vulkan", "--cuda"],
  ]) {
    const r = spawnSync(process.execPath, ["run", join(import.meta.dir, "..", "build.ts"), ...args], { encoding: "utf8" });
    expect(r.status).toBe(2);
    expect(r.stderr.trim().split("\n")).toHaveLength(1);
    expect(r.stderr).toStartWith("build: ");
  }
});

test.skipIf(process.platform !== "linux")("the_native_library_needs_only_the_c_runtime_to_load", () => {
  const lib = findNativeLib() as string;
  const r = spawnSync("readelf", ["-d", lib], { encoding: "utf8" });
  expect(r.status).toBe(0);
  const needed = [...r.stdout.matchAll(/\(NEEDED\)\s+Shared library: \[([^\]]+)\]/g)].map((m) => m[1] as string);
  expect(needed.length).toBeGreaterThan(0);
  // No libstdc++, libgomp or sibling ggml libraries: one file loads on its own.
  for (const n of needed) expect(n).toMatch(/^(libc|libm|libdl|libpthread|librt|ld-linux[-\w]*)\.so(\.\d+)?$/);
});

test("cuda_and_metal_variants_configure_their_ggml_backend_and_cpu_builds_configure_neither", () => {
  const cuda = parseArgs(["native", "--cuda", "--cuda-arch", "86,89-real"]).native;
  expect(cuda).toMatchObject({ variant: "cuda", cudaArch: "86;89-real" });
  const cudaFlags = cmakeFlags(cuda, "/b");
  expect(cudaFlags).toContain("-DGGML_CUDA=ON");
  expect(cudaFlags).toContain("-DGGML_METAL=OFF");
  expect(cudaFlags).toContain("-DCMAKE_CUDA_ARCHITECTURES=86;89-real");
  const metal = cmakeFlags({ ...cpu, variant: "metal" }, "/b");
  expect(metal).toContain("-DGGML_METAL=ON");
  expect(metal).toContain("-DGGML_METAL_EMBED_LIBRARY=ON");
  expect(metal).toContain("-DGGML_CUDA=OFF");
  const plain = cmakeFlags(parseArgs([]).native, "/b");
  expect(plain).toContain(process.platform === "darwin" ? "-DGGML_METAL=ON" : "-DGGML_CUDA=OFF");
  expect(plain).toContain("-DGGML_NATIVE=ON");
  expect(plain.some((f) => f.startsWith("-DCMAKE_CUDA_ARCHITECTURES"))).toBe(false);
  // The RPC backend is forced on by our CMake wrapper for every variant.
  expect(readFileSync(join(import.meta.dir, "..", "vendor", "llama.cpp", "CMakeLists.txt"), "utf8")).toContain("set(GGML_RPC ON");
});

test("portable_builds_leave_out_host_specific_cpu_instructions", () => {
  const flags = cmakeFlags(parseArgs(["--portable"]).native, "/b");
  expect(flags).toContain("-DGGML_NATIVE=OFF");
  if (process.arch === "x64") for (const f of ["-DGGML_AVX2=OFF", "-DGGML_FMA=OFF", "-DGGML_F16C=OFF"]) expect(flags).toContain(f);
});

test.skipIf(process.platform !== "linux")("the_native_library_answers_to_libggml_base_and_exports_only_ggml_and_our_entry_points", () => {
  const lib = findNativeLib() as string;
  const d = spawnSync("readelf", ["-d", lib], { encoding: "utf8" });
  // A prebuilt backend's DT_NEEDED libggml-base.so binds to this library, not to a second ggml.
  expect(d.stdout).toMatch(/\(SONAME\)\s+Library soname: \[libggml-base\.so\]/);
  const nm = spawnSync("nm", ["-D", "--defined-only", lib], { encoding: "utf8" });
  const names = [...nm.stdout.matchAll(/ [TDBRVW] (\S+)$/gm)].map((m) => m[1] as string);
  for (const want of [
    "mesh_backend_load",
    "ggml_backend_buffer_init",
    "ggml_backend_reg_dev_get",
    "ggml_log_internal",
    "gguf_init_from_file",
  ]) {
    expect(names).toContain(want);
  }
  // llama.cpp's C++ and the static libstdc++ stay inside.
  expect(names.filter((n) => !/^(mesh_|ggml_|gguf_)/.test(n))).toEqual([]);
});

test("linux_arm64_is_cross_built_with_the_gnu_toolchain_and_no_host_cpu_flags", () => {
  const o = parseArgs(["compile", "--target", "linux-arm64"]).native;
  expect(o.target).toBe("linux-arm64");
  if (`${process.platform}-${process.arch}` === "linux-arm64") return;
  const flags = cmakeFlags(o, "/b");
  for (const f of [
    "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
    "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc",
    "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
  ]) {
    expect(flags).toContain(f);
  }
  expect(flags).toContain("-DGGML_NATIVE=OFF");
  expect(flags).not.toContain("-DGGML_NATIVE=ON");
  expect(flags).not.toContain("-DGGML_AVX2=OFF");
  expect(buildDirName(o)).toBe("cpu-linux-arm64");
  expect(buildDirName({ ...o, portable: true })).toBe("cpu-portable-linux-arm64");
  expect(buildDirName({ ...o, target: undefined })).toBe("cpu");
});

test("every_platform_file_has_its_own_name", () => {
  expect(executableName("cpu", "linux-x64")).toBe("mesh-linux-x64");
  expect(executableName("cpu", "linux-x64", "vulkan")).toBe("mesh-linux-x64-vulkan");
  expect(executableName("cpu", "linux-x64", "cuda")).toBe("mesh-linux-x64-cuda");
  expect(executableName("cuda", "linux-x64")).toBe("mesh-linux-x64-cuda");
  expect(executableName("cpu", "linux-arm64")).toBe("mesh-linux-arm64");
  expect(executableName("metal", "darwin-arm64")).toBe("mesh-darwin-arm64");
  expect(parseArgs(["compile", "--vulkan"]).native.prebuilt).toBe("vulkan");
  expect(parseArgs(["compile", "--cuda-prebuilt"]).native.prebuilt).toBe("cuda");
});

test("prebuilt_backends_come_from_the_same_release_as_the_source_pin_with_an_integrity", () => {
  const pin = JSON.parse(readFileSync(join(import.meta.dir, "..", "vendor", "llama.cpp", "pin.json"), "utf8"));
  for (const p of Object.values(readPrebuilt())) {
    // A backend of another release would not match our ggml's internal structures.
    expect(p.version).toBe(pin.version);
    expect(p.integrity).toMatch(/^sha512-[A-Za-z0-9+/]+=*$/);
    expect(p.file).toMatch(/\/libggml-(vulkan|cuda)\.so$/);
  }
});

test("the_version_a_compiled_file_reports_names_the_llama_cpp_commit_the_backend_and_the_flags", () => {
  const o = parseArgs(["compile", "--vulkan", "--portable"]).native;
  const info = buildInfoOf(o, cmakeFlags(o, "/b")) as { llamaCpp: { commit: string }; backend: string; buildFlags: string[] };
  const pin = JSON.parse(readFileSync(join(import.meta.dir, "..", "vendor", "llama.cpp", "pin.json"), "utf8"));
  expect(info.llamaCpp.commit).toBe(pin.commit);
  expect(info.backend).toStartWith("vulkan (prebuilt @node-llama-cpp/linux-x64-vulkan@");
  expect(info.buildFlags).toContain("GGML_NATIVE=OFF");
});

test("a_cross_built_file_gets_each_addon_the_host_has_in_its_target_build_pinned_by_integrity", () => {
  const lock = JSON.parse(readFileSync(join(import.meta.dir, "..", "package-lock.json"), "utf8")) as { packages: Record<string, unknown> };
  const pinned = readPlatformAddons()["linux-arm64"] ?? [];
  // Every napi-rs addon installed for linux-x64 has a linux-arm64 build pinned for the arm64 file.
  const hostAddons = Object.keys(lock.packages)
    .filter((k) => k.endsWith("-linux-x64-gnu"))
    .map((k) => k.replace(/^node_modules\//, "").replace(/-linux-x64-gnu$/, "-linux-arm64-gnu"));
  expect(hostAddons.length).toBeGreaterThan(0);
  expect(pinned.map((a) => a.package).sort()).toEqual(hostAddons.sort());
  for (const a of pinned) expect(a.integrity).toMatch(/^sha512-[A-Za-z0-9+/]+=*$/);
});
