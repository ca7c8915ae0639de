// Builds the native llama.cpp library (and, for benchmarks, llama-server) from
// the pinned source package, and the single-file executables.
//
//   bun run build.ts native [--cuda] [--portable] [--with-llama-server] [--jobs N]
//   bun run build.ts compile [--target linux-arm64] [--vulkan | --cuda-prebuilt]
//
// The source is the git bundle that the npm package node-llama-cpp ships;
// nothing of llama.cpp is committed. A build is skipped when its stamp (pin,
// shim, CMake wrapper, options) is unchanged. GPU backends that cannot be
// compiled here (Vulkan: Debian's glslc and headers are too old; CUDA: no
// toolkit) come prebuilt from the same llama.cpp release (prebuilt.json), are
// checked against a pinned integrity like the source, and are loaded at run
// time through ggml's backend registry.
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { basename, join } from "node:path";
import { buildConsolePage } from "./src/server/console/page";

const ROOT = import.meta.dir;
const VENDOR = join(ROOT, "vendor", "llama.cpp");
const CACHE = join(VENDOR, ".cache");
const SRC = join(VENDOR, "src");

interface Pin {
  package: string;
  version: string;
  integrity: string;
  bundle: string;
  commit: string;
  llamaCppTag: string;
}

/** Options of a native build. */
export interface NativeOptions {
  variant: "cpu" | "cuda" | "metal";
  portable: boolean;
  withLlamaServer: boolean;
  jobs: number;
  /** CMAKE_CUDA_ARCHITECTURES for --cuda (e.g. "86" or "89-real"); ggml's own list when absent. */
  cudaArch?: string;
  /** The platform to build for, e.g. "linux-arm64" cross-compiled on linux-x64; the host when absent. */
  target?: string;
  /** A prebuilt GPU backend of the pinned release to ship beside the CPU library (compile only). */
  prebuilt?: PrebuiltName;
}

/** The GPU backends taken prebuilt from the pinned release. */
export type PrebuiltName = "vulkan" | "cuda";

/** One prebuilt backend: the npm package that ships it, its integrity, the library inside, what it needs at run time. */
export interface Prebuilt {
  package: string;
  version: string;
  integrity: string;
  file: string;
  needs: string;
}

/** The platform this build runs on, as "<os>-<arch>". */
export function hostTarget(): string {
  return `${process.platform}-${process.arch}`;
}

// Cross builds this host can make: the platform, the GNU toolchain prefix, CMake's processor name.
const CROSS: Record<string, { from: string; prefix: string; processor: string; bun: string }> = {
  "linux-arm64": { from: "linux-x64", prefix: "aarch64-linux-gnu", processor: "aarch64", bun: "bun-linux-arm64" },
};

function log(msg: string): void {
  process.stderr.write(`[build] ${msg}\n`);
}

/** A build that could not be done: exit 1. */
function fail(msg: string): never {
  process.stderr.write(`build: ${msg}\n`);
  process.exit(1);
}

/** A command line that makes no sense: exit 2, as the mesh CLI does for bad input. */
function usage(msg: string): never {
  process.stderr.write(`build: ${msg}\n`);
  process.exit(2);
}

function run(cmd: string, args: string[], cwd = ROOT, quiet = false): void {
  const r = spawnSync(cmd, args, { cwd, stdio: quiet ? ["ignore", "ignore", "inherit"] : "inherit" });
  if (r.error) fail(`${cmd} could not be started: ${r.error.message}`);
  if (r.status !== 0) fail(`${cmd} ${args.join(" ")} exited with ${r.status}`);
}

function readPin(): Pin {
  return JSON.parse(readFileSync(join(VENDOR, "pin.json"), "utf8")) as Pin;
}

/** The prebuilt backends of the pinned release (vendor/llama.cpp/prebuilt.json). */
export function readPrebuilt(vendor = VENDOR): Record<PrebuiltName, Prebuilt> {
  return JSON.parse(readFileSync(join(vendor, "prebuilt.json"), "utf8")) as Record<PrebuiltName, Prebuilt>;
}

/** The prebuilt backend library, fetched with npm pack, integrity-checked and unpacked into the cache; returns its path. */
export function fetchPrebuilt(name: PrebuiltName): string {
  const p = readPrebuilt()[name];
  const pin = readPin();
  // A backend from another release would not match our ggml's internal structures.
  if (p.version !== pin.version) fail(`prebuilt ${name} is ${p.package}@${p.version} but the source pin is ${pin.version}`);
  mkdirSync(CACHE, { recursive: true });
  const tgz = join(CACHE, `${p.package.replace(/^@/, "").replace("/", "-")}-${p.version}.tgz`);
  if (!existsSync(tgz)) {
    log(`fetching ${p.package}@${p.version} from the npm registry`);
    run("npm", ["pack", `${p.package}@${p.version}`, "--pack-destination", CACHE, "--silent"], ROOT, true);
  }
  const actual = integrityMismatch(readFileSync(tgz), p.integrity);
  if (actual !== null) {
    rmSync(tgz, { force: true });
    fail(`${tgz} does not match the pinned integrity (got ${actual}); it was removed, run again`);
  }
  const dir = join(CACHE, "prebuilt", `${name}-${p.version}`);
  const lib = join(dir, basename(p.file));
  if (!existsSync(lib)) {
    const unpack = `${dir}.tmp-${process.pid}`;
    rmSync(unpack, { recursive: true, force: true });
    mkdirSync(unpack, { recursive: true });
    run("tar", ["xzf", tgz, "-C", unpack, p.file]);
    mkdirSync(dir, { recursive: true });
    renameSync(join(unpack, p.file), lib);
    rmSync(unpack, { recursive: true, force: true });
  }
  return lib;
}

// Fetch the pinned package tarball from the npm registry and check its integrity.
function fetchTarball(pin: Pin): string {
  mkdirSync(CACHE, { recursive: true });
  const tgz = join(CACHE, `${pin.package}-${pin.version}.tgz`);
  if (!existsSync(tgz)) {
    log(`fetching ${pin.package}@${pin.version} from the npm registry`);
    run("npm", ["pack", `${pin.package}@${pin.version}`, "--pack-destination", CACHE, "--silent"], ROOT, true);
  }
  const actual = integrityMismatch(readFileSync(tgz), pin.integrity);
  if (actual !== null) {
    rmSync(tgz, { force: true });
    fail(`${tgz} does not match the pinned integrity (got ${actual}); it was removed, run again`);
  }
  return tgz;
}

/** null when data matches an npm-style integrity string ("sha512-<base64>"), else the integrity data really has. */
export function integrityMismatch(data: Uint8Array, integrity: string): string | null {
  const [algo, expected] = integrity.split("-", 2) as [string, string];
  const actual = createHash(algo).update(data).digest("base64");
  return actual === expected ? null : `${algo}-${actual}`;
}

function gitHead(dir: string): string | null {
  const r = spawnSync("git", ["-C", dir, "rev-parse", "HEAD"], { encoding: "utf8" });
  return r.status === 0 ? r.stdout.trim() : null;
}

/** Make vendor/llama.cpp/src hold the pinned commit (clone the bundle when needed). */
export function ensureSource(): void {
  const pin = readPin();
  if (existsSync(join(SRC, ".git")) && gitHead(SRC) === pin.commit) return;
  const tgz = fetchTarball(pin);
  log("unpacking the llama.cpp source bundle");
  const unpack = join(CACHE, "unpack");
  rmSync(unpack, { recursive: true, force: true });
  mkdirSync(unpack, { recursive: true });
  run("tar", ["xzf", tgz, "-C", unpack, pin.bundle]);
  rmSync(SRC, { recursive: true, force: true });
  run("git", ["clone", "--quiet", "--no-checkout", join(unpack, pin.bundle), SRC]);
  run("git", ["-c", "advice.detachedHead=false", "-C", SRC, "checkout", "--quiet", pin.commit]);
  rmSync(unpack, { recursive: true, force: true });
  if (gitHead(SRC) !== pin.commit) fail(`the bundle does not contain commit ${pin.commit}`);
}

/** What a build depends on, hashed: the pin, the CMake wrapper, the shim and the options. */
export function stampOf(o: NativeOptions, vendor = VENDOR): string {
  const h = createHash("sha256");
  for (const f of ["pin.json", "CMakeLists.txt", join("shim", "mesh_shim.c"), join("shim", "mesh_attn.cpp"), join("shim", "mesh_fa.cpp")])
    h.update(readFileSync(join(vendor, f)));
  for (const f of [join("shim", "exports.map")]) if (existsSync(join(vendor, f))) h.update(readFileSync(join(vendor, f)));
  const target = o.target && o.target !== hostTarget() ? o.target : null;
  h.update(JSON.stringify({ variant: o.variant, portable: o.portable, cudaArch: o.cudaArch ?? null, ...(target ? { target } : {}) }));
  return h.digest("hex");
}

/** The CMake configure arguments for a variant (GPU backends, CPU baseline, GPU architectures). */
export function cmakeFlags(o: NativeOptions, dir: string): string[] {
  const flags = [
    "-S",
    VENDOR,
    "-B",
    dir,
    "-DCMAKE_BUILD_TYPE=Release",
    `-DGGML_NATIVE=${o.portable ? "OFF" : "ON"}`,
    // Always configured, built only on request: asking for it later recompiles nothing else.
    "-DMESH_WITH_LLAMA_SERVER=ON",
    `-DGGML_CUDA=${o.variant === "cuda" ? "ON" : "OFF"}`,
    `-DGGML_METAL=${o.variant === "metal" ? "ON" : "OFF"}`,
  ];
  if (o.variant === "metal") flags.push("-DGGML_METAL_EMBED_LIBRARY=ON");
  // One architecture compiles several times faster than ggml's default list.
  if (o.variant === "cuda" && o.cudaArch) flags.push(`-DCMAKE_CUDA_ARCHITECTURES=${o.cudaArch}`);
  const cross = o.target && o.target !== hostTarget() ? CROSS[o.target] : undefined;
  if (cross) {
    // GNU cross toolchain (Debian: g++-aarch64-linux-gnu); no host CPU flags can apply.
    flags.push(
      "-DCMAKE_SYSTEM_NAME=Linux",
      `-DCMAKE_SYSTEM_PROCESSOR=${cross.processor}`,
      `-DCMAKE_C_COMPILER=${cross.prefix}-gcc`,
      `-DCMAKE_CXX_COMPILER=${cross.prefix}-g++`,
      `-DCMAKE_FIND_ROOT_PATH=/usr/${cross.prefix}`,
      "-DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER",
      "-DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY",
      "-DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY",
    );
    flags[flags.indexOf("-DGGML_NATIVE=ON")] = "-DGGML_NATIVE=OFF";
  }
  if (o.portable && (o.target ?? hostTarget()).endsWith("-x64")) {
    // Release builds must run on any x86-64 CPU of the last decade: AVX2/FMA/F16C
    // would exclude some, so the portable baseline stops at SSE4.2.
    flags.push("-DGGML_AVX=OFF", "-DGGML_AVX2=OFF", "-DGGML_FMA=OFF", "-DGGML_F16C=OFF", "-DGGML_AVX512=OFF", "-DGGML_BMI2=OFF");
  }
  return flags;
}

/** Build the native library variant (and llama-server when asked); returns the build directory. */
export function buildNative(o: NativeOptions): string {
  ensureSource();
  const dir = join(VENDOR, "build", buildDirName(o));
  const stampFile = join(dir, "mesh-build.stamp");
  const stamp = stampOf(o);
  const serverBin = join(dir, "bin", "llama-server");
  // ggml-rpc-server too: the split-model benchmark runs llama-server --rpc against it.
  const needServer = o.withLlamaServer && (!existsSync(serverBin) || !existsSync(join(dir, "bin", "ggml-rpc-server")));
  const cross = o.target && o.target !== hostTarget() ? CROSS[o.target] : undefined;
  if (o.target && o.target !== hostTarget() && !cross)
    usage(`cannot build for ${o.target} on ${hostTarget()} (cross builds: ${crossTargets()})`);
  if (cross && cross.from !== hostTarget()) usage(`${o.target} is cross-built on ${cross.from} only`);
  if (cross && o.withLlamaServer) usage("--with-llama-server is for benchmarks on the host; it cannot be cross-built");
  if (cross && spawnSync(`${cross.prefix}-g++`, ["--version"]).status !== 0) {
    fail(
      `${cross.prefix}-g++ not found: install the cross toolchain (Debian: apt-get install g++-${cross.prefix} libc6-${o.target?.split("-")[1]}-cross)`,
    );
  }
  if (existsSync(stampFile) && readFileSync(stampFile, "utf8") === stamp && !needServer) {
    log(`native ${o.variant} library is up to date (${dir})`);
    return dir;
  }
  const flags = cmakeFlags(o, dir);
  log(`configuring ${o.variant}${o.portable ? " (portable)" : ""} in ${dir}`);
  run("cmake", flags, ROOT, true);
  const targets = ["meshllama", ...(o.withLlamaServer ? ["llama-server", "ggml-rpc-server"] : [])];
  log(`compiling ${targets.join(" + ")} with ${o.jobs} jobs (a CPU build takes 3-4 minutes on 2 cores)`);
  run("cmake", ["--build", dir, "--config", "Release", "-j", String(o.jobs), "--target", ...targets]);
  writeFileSync(stampFile, stamp);
  log(`built ${join(dir, "libmeshllama")}`);
  return dir;
}

/** A native Node addon's build for one platform (napi-rs packages ship one npm package per platform). */
export interface PlatformAddon {
  package: string;
  version: string;
  integrity: string;
  why: string;
}

/** The addon builds each platform's file needs beyond what npm installed (vendor/platform-addons.json). */
export function readPlatformAddons(root = ROOT): Record<string, PlatformAddon[]> {
  return JSON.parse(readFileSync(join(root, "vendor", "platform-addons.json"), "utf8")) as Record<string, PlatformAddon[]>;
}

/**
 * Put the target platform's builds of our native addons into node_modules, where
 * bun build --compile finds and embeds them: npm installs only the host's (and
 * for linux-arm64 the version our lock names was never published). Fetched with
 * npm pack and checked against the pinned integrity, like the llama.cpp source.
 */
export function ensurePlatformAddons(target: string): void {
  for (const a of readPlatformAddons()[target] ?? []) {
    const dir = join(ROOT, "node_modules", ...a.package.split("/"));
    const pkg = join(dir, "package.json");
    if (existsSync(pkg) && (JSON.parse(readFileSync(pkg, "utf8")) as { version: string }).version === a.version) continue;
    mkdirSync(CACHE, { recursive: true });
    const tgz = join(CACHE, `${a.package.replace(/^@/, "").replace("/", "-")}-${a.version}.tgz`);
    if (!existsSync(tgz)) {
      log(`fetching ${a.package}@${a.version} for ${target}`);
      run("npm", ["pack", `${a.package}@${a.version}`, "--pack-destination", CACHE, "--silent"], ROOT, true);
    }
    const actual = integrityMismatch(readFileSync(tgz), a.integrity);
    if (actual !== null) {
      rmSync(tgz, { force: true });
      fail(`${tgz} does not match the pinned integrity (got ${actual}); it was removed, run again`);
    }
    const unpack = `${dir}.tmp-${process.pid}`;
    rmSync(unpack, { recursive: true, force: true });
    mkdirSync(unpack, { recursive: true });
    run("tar", ["xzf", tgz, "-C", unpack, "--strip-components=1"]);
    rmSync(dir, { recursive: true, force: true });
    renameSync(unpack, dir);
    log(`installed ${a.package}@${a.version} into node_modules for ${target}`);
  }
}

/** The build directory's name for a variant: cpu, cpu-portable, cpu-linux-arm64, cuda... */
export function buildDirName(o: Pick<NativeOptions, "variant" | "portable" | "target">): string {
  const cross = o.target && o.target !== hostTarget() ? `-${o.target}` : "";
  return `${o.variant}${o.portable ? "-portable" : ""}${cross}`;
}

function crossTargets(): string {
  return Object.entries(CROSS)
    .map(([t, c]) => `${t} on ${c.from}`)
    .join(", ");
}

/** The executable name for a variant, e.g. mesh-linux-x64, mesh-linux-x64-cuda, mesh-linux-x64-vulkan, mesh-linux-arm64. */
export function executableName(variant: NativeOptions["variant"], target = hostTarget(), prebuilt?: PrebuiltName): string {
  const gpu = prebuilt ?? (variant === "cuda" ? "cuda" : null);
  return `mesh-${target}${gpu ? `-${gpu}` : ""}`;
}

// Every file of a release, and what builds each (see .github/workflows/release.yml).
const HOW: Record<string, string> = {
  "linux-x64": "compile on linux-x64",
  "linux-x64-vulkan": "compile --vulkan on linux-x64",
  "linux-x64-cuda": "compile --cuda-prebuilt on linux-x64 (or --cuda with the CUDA toolkit)",
  "linux-arm64": "compile --target linux-arm64 on linux-x64 (g++-aarch64-linux-gnu), or compile on an arm64 host",
  "darwin-arm64": "compile on a macOS arm64 host (Metal can only be built there: the release workflow's macOS runner)",
  "darwin-x64": "compile on a macOS x64 host (the release workflow)",
};
const ALL_TARGETS = Object.keys(HOW);

/** What `mesh --version` reports for a compiled file: the llama.cpp release and commit, the backend, the build flags. */
export function buildInfoOf(o: NativeOptions, flags: string[]): Record<string, unknown> {
  const pin = readPin();
  const version = (JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { version: string }).version;
  const target = o.target ?? hostTarget();
  const backend = o.prebuilt
    ? `${o.prebuilt} (prebuilt ${readPrebuilt()[o.prebuilt].package}@${readPrebuilt()[o.prebuilt].version}, loaded at run time) + cpu`
    : o.variant === "cpu"
      ? "cpu"
      : `${o.variant} + cpu`;
  const shown = flags.filter(
    (f) => f.startsWith("-DGGML_") || f.startsWith("-DCMAKE_CUDA_ARCH") || f.startsWith("-DCMAKE_SYSTEM_PROCESSOR"),
  );
  return {
    version,
    llamaCpp: { release: pin.llamaCppTag, commit: pin.commit, source: `${pin.package}@${pin.version}` },
    target,
    backend,
    buildFlags: shown.map((f) => f.replace(/^-D/, "")),
  };
}

/**
 * Build dist/mesh-<os>-<arch>[-cuda]: one executable embedding the native
 * library, the demo and bench models' vocabularies and the engine Worker.
 */
export async function compileExecutable(o: NativeOptions, outDir = join(ROOT, "dist")): Promise<string> {
  const target = o.target ?? hostTarget();
  if (o.prebuilt && target !== "linux-x64") usage(`the prebuilt ${o.prebuilt} backend is for linux-x64 only`);
  if (o.prebuilt && o.variant !== "cpu")
    usage(`--${o.prebuilt === "cuda" ? "cuda-prebuilt" : o.prebuilt} ships beside the CPU library; drop --cuda`);
  const dir = buildNative(o);
  ensurePlatformAddons(target);
  const backends = o.prebuilt ? [fetchPrebuilt(o.prebuilt)] : [];
  const lib = join(dir, target.startsWith("darwin") ? "libmeshllama.dylib" : "libmeshllama.so");
  const info = buildInfoOf(o, cmakeFlags(o, dir));
  // The tiny model's tokenizer and the bench model's: `mesh bench` generates its model from the file alone.
  const vocab = join(SRC, "models", "ggml-vocab-phi-3.gguf");
  const benchVocab = join(SRC, "models", "ggml-vocab-llama-spm.gguf");
  // The entry sits at the repo root so bundled paths (src/engine/worker) are stable.
  const entry = join(ROOT, `.build-entry-${process.pid}.ts`);
  // The console page, bundled now (one HTML document) and embedded: the executable serves it offline.
  const page = join(ROOT, `.build-console-${process.pid}.html`);
  writeFileSync(page, await buildConsolePage());
  log(`console page: ${statSync(page).size} bytes`);
  writeFileSync(
    entry,
    [
      "// Generated by build.ts for bun build --compile; not committed.",
      `import lib from ${JSON.stringify(lib)} with { type: "file" };`,
      `import vocab from ${JSON.stringify(vocab)} with { type: "file" };`,
      `import benchVocab from ${JSON.stringify(benchVocab)} with { type: "file" };`,
      ...backends.map((b, i) => `import backend${i} from ${JSON.stringify(b)} with { type: "file" };`),
      `import consolePage from ${JSON.stringify(page)} with { type: "file" };`,
      'import { installEmbedded } from "./src/cli/embedded";',
      'import { setBuildInfo } from "./src/cli/build-info";',
      'import { setEmbeddedConsolePage } from "./src/server/console/page";',
      `setBuildInfo(${JSON.stringify(info)});`,
      "setEmbeddedConsolePage(consolePage);",
      `await installEmbedded(lib, { "phi-3": vocab, "llama-spm": benchVocab }, new URL("./src/engine/worker.ts", import.meta.url).href, [${backends.map((_, i) => `backend${i}`).join(", ")}]);`,
      'const { main } = await import("./src/cli/main");',
      "await main(process.argv);",
      "",
    ].join("\n"),
  );
  mkdirSync(outDir, { recursive: true });
  const out = join(outDir, executableName(o.variant, target, o.prebuilt));
  const cross = target !== hostTarget() ? CROSS[target] : undefined;
  try {
    log(`compiling ${out}`);
    run(
      process.execPath,
      [
        "build",
        "--compile",
        ...(cross ? [`--target=${cross.bun}`] : []),
        "--minify-syntax",
        entry,
        join(ROOT, "src", "engine", "worker.ts"),
        "--outfile",
        out,
      ],
      ROOT,
      true,
    );
  } finally {
    rmSync(entry, { force: true });
    rmSync(page, { force: true });
  }
  const here = executableName(o.variant, target, o.prebuilt).replace(/^mesh-/, "");
  for (const t of ALL_TARGETS) if (t !== here) log(`other file mesh-${t}: ${HOW[t]}`);
  log(`built ${out}`);
  return out;
}

/** Parse build.ts arguments; a bad one exits 2. */
export function parseArgs(argv: string[]): { command: string; native: NativeOptions } {
  let command = "native";
  const native: NativeOptions = {
    variant: process.platform === "darwin" ? "metal" : "cpu",
    portable: false,
    withLlamaServer: false,
    jobs: cpus().length,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    if (a === "--cuda") native.variant = "cuda";
    else if (a === "--vulkan") native.prebuilt = "vulkan";
    else if (a === "--cuda-prebuilt") native.prebuilt = "cuda";
    else if (a === "--target") {
      const v = argv[++i] ?? "";
      if (v !== hostTarget() && !CROSS[v]) usage(`--target takes ${hostTarget()} or a cross target (${crossTargets()})`);
      native.target = v;
    } else if (a === "--portable") native.portable = true;
    else if (a === "--with-llama-server") native.withLlamaServer = true;
    else if (a === "--cuda-arch") {
      const v = argv[++i] ?? "";
      if (!/^[0-9a-z;,-]+$/.test(v)) usage("--cuda-arch takes CUDA architectures, e.g. 86 or '86-real;89-real'");
      native.cudaArch = v.replaceAll(",", ";");
    } else if (a === "--jobs") {
      const n = Number(argv[++i]);
      if (!Number.isInteger(n) || n < 1) usage("--jobs takes a positive whole number");
      native.jobs = n;
    } else if (a === "native" || a === "source" || a === "compile" || a === "prebuilt") command = a;
    else if (a === "--help" || a === "-h") command = "help";
    else usage(`unknown argument '${a}' (try --help)`);
  }
  if (native.prebuilt && native.variant !== "cpu")
    usage(`--${native.prebuilt === "cuda" ? "cuda-prebuilt" : "vulkan"} ships beside the CPU library; drop --cuda`);
  return { command, native };
}

if (import.meta.main) {
  const { command, native } = parseArgs(process.argv.slice(2));
  if (command === "help") {
    process.stdout.write(
      [
        "usage: bun run build.ts [native|source|compile|prebuilt] [options]",
        "",
        "  source               fetch and verify the pinned llama.cpp source only",
        "  native               build the native library (default)",
        "  compile              build dist/mesh-<os>-<arch>: one file with everything inside",
        "  prebuilt             fetch and verify a prebuilt backend (--vulkan, --cuda-prebuilt); print its path",
        "                       (use --portable for a file that runs on any CPU of the platform)",
        "",
        "  --cuda               build the CUDA variant from source (needs the CUDA toolkit)",
        "  --cuda-prebuilt      compile: ship the pinned release's prebuilt CUDA backend (no toolkit needed",
        "                       here; users need the NVIDIA driver and the CUDA 13 runtime)",
        "  --vulkan             compile: ship the pinned release's prebuilt Vulkan backend",
        "  --target linux-arm64 cross-build for another platform (needs g++-aarch64-linux-gnu)",
        "  --cuda-arch LIST     only these GPU architectures (e.g. 86, or 86,89); much faster to compile",
        "  --portable           no host-specific CPU instructions (release builds)",
        "  --with-llama-server  also build llama-server, for side-by-side benchmarks",
        "  --jobs N             parallel compile jobs (default: all cores)",
        "",
      ].join("\n"),
    );
  } else if (command === "source") ensureSource();
  else if (command === "prebuilt") {
    if (!native.prebuilt) usage("prebuilt takes --vulkan or --cuda-prebuilt");
    process.stdout.write(`${fetchPrebuilt(native.prebuilt)}\n`);
  } else if (command === "compile") await compileExecutable(native);
  else buildNative(native);
}
