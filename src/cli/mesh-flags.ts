// The mesh flags of `mesh serve`: which mesh to create or join, and which
// address to tell peers. Bad combinations are UsageErrors (exit 2).
import { existsSync, readFileSync } from "node:fs";
import { hostname, type NetworkInterfaceInfo, networkInterfaces } from "node:os";
import { defaultStateDir } from "../dirs";
import { checkSecret, isAddr, parseInvite } from "../mesh/invite";
import { UsageError } from "./usage";

/** Mesh options of `mesh serve`, as parsed by commander. */
export interface MeshFlags {
  stateDir?: string;
  join?: string;
  meshSecret?: string;
  meshSecretFile?: string;
  advertise?: string;
  nodeName?: string;
  /** "cache" (default) or "load". */
  routing?: string;
}

/** What the flags ask for. */
export interface MeshPlan {
  stateDir: string;
  /** The secret to join with (from the token or --mesh-secret); null: the stored one, or a new mesh. */
  secret: string | null;
  /** Addresses to join through; empty for the first node. */
  seeds: string[];
  nodeName: string;
  /** --advertise as given ("host:port"), or null to derive it from the listen address. */
  advertise: string | null;
  routing: "cache" | "load";
}

const MAX_NAME = 64;

function readSecret(f: MeshFlags): string | null {
  if (f.meshSecret !== undefined && f.meshSecretFile !== undefined)
    throw new UsageError("give --mesh-secret or --mesh-secret-file, not both");
  let secret: string | undefined = f.meshSecret;
  if (f.meshSecretFile !== undefined) {
    if (!existsSync(f.meshSecretFile)) throw new UsageError(`mesh secret file not found: ${f.meshSecretFile}`);
    secret = readFileSync(f.meshSecretFile, "utf8").replace(/\r?\n$/, "");
  }
  if (secret === undefined) return null;
  const ok = checkSecret(secret);
  if (!ok.ok) throw new UsageError(ok.message);
  return secret;
}

/** Check the mesh flags, e.g. `planMesh({ join: "<token>" })`; throws UsageError. */
export function planMesh(f: MeshFlags): MeshPlan {
  const stateDir = f.stateDir ?? defaultStateDir();
  if (stateDir.trim() === "") throw new UsageError("--state-dir must not be empty");
  const nodeName = f.nodeName ?? hostname();
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(nodeName) || nodeName.length > MAX_NAME) {
    throw new UsageError(`--node-name must be 1-${MAX_NAME} letters, digits, '.', '_' or '-', got '${nodeName}'`);
  }
  if (f.advertise !== undefined) checkAdvertise(f.advertise);
  const routing = f.routing ?? "cache";
  if (routing !== "cache" && routing !== "load") throw new UsageError(`--routing must be 'cache' or 'load', got '${routing}'`);
  const given = readSecret(f);
  const base = { stateDir, nodeName, advertise: f.advertise ?? null, routing } as const;
  if (f.join === undefined) return { ...base, secret: given, seeds: [] };
  if (isAddr(f.join)) {
    if (given === null)
      throw new UsageError("--join host:port needs the mesh secret: --mesh-secret or --mesh-secret-file (or join with an invite token)");
    return { ...base, secret: given, seeds: [f.join] };
  }
  if (given !== null) throw new UsageError("an invite token carries the mesh secret: drop --mesh-secret/--mesh-secret-file");
  const invite = parseInvite(f.join);
  if (!invite.ok) throw new UsageError(`--join: ${invite.message}`);
  return { ...base, secret: invite.value.secret, seeds: invite.value.addrs };
}

function isUnspecified(host: string): boolean {
  return host === "0.0.0.0" || host === "::" || host === "[::]" || host === "";
}

function checkAdvertise(addr: string): void {
  if (!isAddr(addr)) throw new UsageError(`--advertise must be host:port (e.g. 192.168.1.20:9337), got '${addr}'`);
  const host = addr.slice(0, addr.lastIndexOf(":"));
  if (isUnspecified(host)) throw new UsageError("--advertise must be an address peers can reach, not 0.0.0.0 or ::");
}

/**
 * The address peers should use for this node: --advertise, else the listen
 * address, else (listening on all interfaces) the first non-loopback IPv4
 * interface. Never 0.0.0.0: peers cannot dial it.
 */
export function advertiseAddr(
  flag: string | null,
  host: string,
  port: number,
  interfaces: NodeJS.Dict<NetworkInterfaceInfo[]> = networkInterfaces(),
): string {
  if (flag) return flag;
  if (!isUnspecified(host)) return host.includes(":") && !host.startsWith("[") ? `[${host}]:${port}` : `${host}:${port}`;
  for (const list of Object.values(interfaces)) {
    for (const i of list ?? []) if (i.family === "IPv4" && !i.internal) return `${i.address}:${port}`;
  }
  throw new UsageError(
    `listening on ${host || "all interfaces"} but no non-loopback network interface was found: pass --advertise host:port`,
  );
}
