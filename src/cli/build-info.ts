// What `mesh --version` reports. A compiled file carries what build.ts knew
// (the backend it ships, the CMake flags); run from source, the same facts are
// read from package.json and the llama.cpp pin.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { REPO_ROOT } from "../engine/library";

/** The build's facts: mesh version, llama.cpp release and commit, platform, backend, build flags. */
export interface BuildInfo {
  version: string;
  llamaCpp: { release: string; commit: string; source: string };
  target: string;
  backend: string;
  buildFlags: string[];
}

let compiled: BuildInfo | null = null;

/** Record the facts build.ts embedded (called by a compiled file's entry point). */
export function setBuildInfo(info: BuildInfo): void {
  compiled = info;
}

/** This build's facts: the embedded ones, else those of the source tree. */
export function buildInfo(): BuildInfo {
  if (compiled) return compiled;
  const pkg = JSON.parse(readFileSync(join(REPO_ROOT, "package.json"), "utf8")) as { version: string };
  const pin = JSON.parse(readFileSync(join(REPO_ROOT, "vendor", "llama.cpp", "pin.json"), "utf8")) as {
    package: string;
    version: string;
    commit: string;
    llamaCppTag: string;
  };
  return {
    version: pkg.version,
    llamaCpp: { release: pin.llamaCppTag, commit: pin.commit, source: `${pin.package}@${pin.version}` },
    target: `${process.platform}-${process.arch}`,
    backend: "from source (the local native build; see vendor/llama.cpp/build)",
    buildFlags: [],
  };
}

/** The human form of `mesh --version`: one fact per line. */
export function formatBuildInfo(b: BuildInfo): string {
  return [
    `mesh ${b.version}`,
    `llama.cpp ${b.llamaCpp.release} (commit ${b.llamaCpp.commit.slice(0, 12)}, from ${b.llamaCpp.source})`,
    `platform  ${b.target}`,
    `backend   ${b.backend}`,
    `flags     ${b.buildFlags.length > 0 ? b.buildFlags.join(" ") : "(not recorded: run from source)"}`,
    "",
  ].join("\n");
}
