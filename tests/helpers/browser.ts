// A headless Chromium for the console's browser tests: the system's browser
// (Debian's `chromium`, installed by .ci/run), driven by puppeteer-core; no
// browser is downloaded. MESH_TEST_CHROMIUM names another executable.
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import puppeteer, { type Browser } from "puppeteer-core";

const CANDIDATES = ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome", "/usr/bin/google-chrome-stable"];

/** The browser executable, or null when this machine has none. */
export function findChromium(): string | null {
  const env = process.env.MESH_TEST_CHROMIUM;
  if (env) return existsSync(env) ? env : null;
  for (const c of CANDIDATES) if (existsSync(c)) return c;
  const which = Bun.which("chromium") ?? Bun.which("chromium-browser") ?? Bun.which("google-chrome");
  return which ?? null;
}

/** Start a headless browser (root may run it: no sandbox in a throwaway test). */
export async function launchBrowser(path: string): Promise<Browser> {
  return puppeteer.launch({
    executablePath: path,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check"],
  });
}

/** Where tests save screenshots (git-ignored). */
export function shotsDir(): string {
  const dir = join(import.meta.dir, "..", "..", ".console-shots");
  mkdirSync(dir, { recursive: true });
  return dir;
}
