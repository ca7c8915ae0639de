import { homedir } from "node:os";
import { join } from "node:path";

/** The user's cache directory for mesh (XDG on Linux, ~/Library/Caches on macOS); MESH_CACHE_DIR overrides. */
export function cacheDir(): string {
  if (process.env.MESH_CACHE_DIR) return process.env.MESH_CACHE_DIR;
  if (process.platform === "darwin") return join(homedir(), "Library", "Caches", "mesh");
  return join(process.env.XDG_CACHE_HOME || join(homedir(), ".cache"), "mesh");
}
