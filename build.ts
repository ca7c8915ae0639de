// Builds the native llama.cpp library (and, for benchmarks, llama-server) from
// the pinned source package, and the single-file executables.
//
//   bun run build.ts native [--cuda] [--portable] [--with-llama-server] [--jobs N]
//
// The source is the git bundle that the npm package node-llama-cpp ships;
// nothing of llama.cpp is committed. A build is skipped when its stamp (pin,
// shim, CMake wrapper, options) is unchanged.
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { join } from "node:path";
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
}

/** Options of a native build. */
export interface NativeOptions {
  variant: "cpu" | "cuda" | "metal";
  portable: boolean;
  withLlamaServer: boolean;
  jobs: number;
  /** CMAKE_CUDA_ARCHITECTURES for --cuda (e.g. "86" or "89-real"); ggml's own list when absent. */
  cudaArch?: string;
}

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
  for (const f of ["pin.json", "CMakeLists.txt", join("shim", "mesh_shim.c")]) h.update(readFileSync(join(vendor, f)));
  h.update(JSON.stringify({ variant: o.variant, portable: o.portable, cudaArch: o.cudaArch ?? null }));
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
  if (o.portable && process.arch === "x64") {
    // Release builds must run on any x86-64 CPU of the last decade: AVX2/FMA/F16C
    // would exclude some, so the portable baseline stops at SSE4.2.
    flags.push("-DGGML_AVX=OFF", "-DGGML_AVX2=OFF", "-DGGML_FMA=OFF", "-DGGML_F16C=OFF", "-DGGML_AVX512=OFF", "-DGGML_BMI2=OFF");
  }
  return flags;
}

/** Build the native library variant (and llama-server when asked); returns the build directory. */
export function buildNative(o: NativeOptions): string {
  ensureSource();
  const dir = join(VENDOR, "build", o.portable ? `${o.variant}-portable` : o.variant);
  const stampFile = join(dir, "mesh-build.stamp");
  const stamp = stampOf(o);
  const serverBin = join(dir, "bin", "llama-server");
  const needServer = o.withLlamaServer && !existsSync(serverBin);
  if (existsSync(stampFile) && readFileSync(stampFile, "utf8") === stamp && !needServer) {
    log(`native ${o.variant} library is up to date (${dir})`);
    return dir;
  }
  const flags = cmakeFlags(o, dir);
  log(`configuring ${o.variant}${o.portable ? " (portable)" : ""} in ${dir}`);
  run("cmake", flags, ROOT, true);
  const targets = ["meshllama", ...(o.withLlamaServer ? ["llama-server"] : [])];
  log(`compiling ${targets.join(" + ")} with ${o.jobs} jobs (a CPU build takes 3-4 minutes on 2 cores)`);
  run("cmake", ["--build", dir, "--config", "Release", "-j", String(o.jobs), "--target", ...targets]);
  writeFileSync(stampFile, stamp);
  log(`built ${join(dir, "libmeshllama")}`);
  return dir;
}

/** The executable name for this host and variant, e.g. mesh-linux-x64 or mesh-linux-x64-cuda. */
export function executableName(variant: NativeOptions["variant"]): string {
  return `mesh-${process.platform}-${process.arch}${variant === "cuda" ? "-cuda" : ""}`;
}

// Other platforms' native libraries need their own toolchains and hosts.
const ALL_TARGETS = ["linux-x64", "linux-x64-cuda", "linux-arm64", "darwin-arm64", "darwin-x64"];

/**
 * Build dist/mesh-<os>-<arch>[-cuda]: one executable embedding the native
 * library, the demo and bench models' vocabularies and the engine Worker.
 */
export async function compileExecutable(o: NativeOptions, outDir = join(ROOT, "dist")): Promise<string> {
  const dir = buildNative(o);
  const lib = join(dir, process.platform === "darwin" ? "libmeshllama.dylib" : "libmeshllama.so");
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
      `import consolePage from ${JSON.stringify(page)} with { type: "file" };`,
      'import { installEmbedded } from "./src/cli/embedded";',
      'import { setEmbeddedConsolePage } from "./src/server/console/page";',
      "setEmbeddedConsolePage(consolePage);",
      'await installEmbedded(lib, { "phi-3": vocab, "llama-spm": benchVocab }, new URL("./src/engine/worker.ts", import.meta.url).href);',
      'const { main } = await import("./src/cli/main");',
      "await main(process.argv);",
      "",
    ].join("\n"),
  );
  mkdirSync(outDir, { recursive: true });
  const out = join(outDir, executableName(o.variant));
  try {
    log(`compiling ${out}`);
    run(
      process.execPath,
      ["build", "--compile", "--minify-syntax", entry, join(ROOT, "src", "engine", "worker.ts"), "--outfile", out],
      ROOT,
      true,
    );
  } finally {
    rmSync(entry, { force: true });
    rmSync(page, { force: true });
  }
  const here = executableName(o.variant).replace(/^mesh-/, "");
  for (const t of ALL_TARGETS) {
    if (t === here) continue;
    if (t === `${here}-cuda`) log(`skipped mesh-${t}: add --cuda on a machine with the CUDA toolkit`);
    else log(`skipped mesh-${t}: its native library must be built on a ${t} host`);
  }
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
    else if (a === "--portable") native.portable = true;
    else if (a === "--with-llama-server") native.withLlamaServer = true;
    else if (a === "--cuda-arch") {
      const v = argv[++i] ?? "";
      if (!/^[0-9a-z;,-]+$/.test(v)) usage("--cuda-arch takes CUDA architectures, e.g. 86 or '86-real;89-real'");
      native.cudaArch = v.replaceAll(",", ";");
    } else if (a === "--jobs") {
      const n = Number(argv[++i]);
      if (!Number.isInteger(n) || n < 1) usage("--jobs takes a positive whole number");
      native.jobs = n;
    } else if (a === "native" || a === "source" || a === "compile") command = a;
    else if (a === "--help" || a === "-h") command = "help";
    else usage(`unknown argument '${a}' (try --help)`);
  }
  return { command, native };
}

if (import.meta.main) {
  const { command, native } = parseArgs(process.argv.slice(2));
  if (command === "help") {
    process.stdout.write(
      [
        "usage: bun run build.ts [native|source|compile] [options]",
        "",
        "  source               fetch and verify the pinned llama.cpp source only",
        "  native               build the native library (default)",
        "  compile              build dist/mesh-<os>-<arch>: one file with everything inside",
        "                       (use --portable for a file that runs on any CPU of the platform)",
        "",
        "  --cuda               build the CUDA variant (needs the CUDA toolkit)",
        "  --cuda-arch LIST     only these GPU architectures (e.g. 86, or 86,89); much faster to compile",
        "  --portable           no host-specific CPU instructions (release builds)",
        "  --with-llama-server  also build llama-server, for side-by-side benchmarks",
        "  --jobs N             parallel compile jobs (default: all cores)",
        "",
      ].join("\n"),
    );
  } else if (command === "source") ensureSource();
  else if (command === "compile") await compileExecutable(native);
  else buildNative(native);
}
