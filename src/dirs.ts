import { homedir } from "node:os";
import { join } from "node:path";

/** The user's cache directory for mesh (XDG on Linux, ~/Library/Caches on macOS); MESH_CACHE_DIR overrides. */
export function cacheDir(): string {
  if (process.env.MESH_CACHE_DIR) return process.env.MESH_CACHE_DIR;
  if (process.platform === "darwin") return join(homedir(), "Library", "Caches", "mesh");
  return join(process.env.XDG_CACHE_HOME || join(homedir(), ".cache"), "mesh");
}

/** Where a node keeps its identity and mesh credentials (XDG data dir on Linux); MESH_STATE_DIR overrides. */
export function defaultStateDir(): string {
  if (process.env.MESH_STATE_DIR) return process.env.MESH_STATE_DIR;
  if (process.platform === "darwin") return join(homedir(), "Library", "Application Support", "mesh");
  return join(process.env.XDG_DATA_HOME || join(homedir(), ".local", "share"), "mesh");
}
