// The console page: one HTML document with its script and styles inline, so
// a node serves it with no CDN, no second server and no other file. A compiled
// executable carries the page built by build.ts (setEmbeddedConsolePage); run
// from source, the page is bundled from src/console on first request.
import { join } from "node:path";

let embedded: string | null = null;
let cached: Promise<ConsolePage> | null = null;

/** The page as served: its HTML and a gzip of it (most browsers take that). */
export interface ConsolePage {
  html: string;
  gzip: Uint8Array;
}

const PAGE_DIR = join(import.meta.dir, "..", "..", "console");

/** Use the page built into the executable (a file embedded by `bun build --compile`). */
export function setEmbeddedConsolePage(path: string): void {
  embedded = path;
  cached = null;
}

/** Bundle src/console into one HTML document (minified script and styles inline). */
export async function buildConsolePage(): Promise<string> {
  const out = await Bun.build({ entrypoints: [join(PAGE_DIR, "main.js")], target: "browser", minify: true, format: "esm" });
  if (!out.success) throw new Error(`the console page did not build: ${out.logs.map((l) => l.message).join("; ")}`);
  const js = (await out.outputs.find((o) => o.kind === "entry-point")?.text()) ?? "";
  const uplotCss = await Bun.file(Bun.resolveSync("uplot/dist/uPlot.min.css", PAGE_DIR)).text();
  const css = await Bun.file(join(PAGE_DIR, "style.css")).text();
  const shell = await Bun.file(join(PAGE_DIR, "index.html")).text();
  // A closing script tag inside the bundle would end the element early.
  const safeJs = js.replaceAll("</script", "<\\/script");
  return shell.replace("/*STYLE*/", () => `${uplotCss}\n${css}`).replace("/*SCRIPT*/", () => safeJs);
}

/** The page, built or read once per process. */
export function consolePage(): Promise<ConsolePage> {
  cached ??= (async () => {
    const html = embedded ? await Bun.file(embedded).text() : await buildConsolePage();
    return { html, gzip: Bun.gzipSync(new TextEncoder().encode(html)) };
  })();
  const p = cached;
  // A failed build is retried on the next request rather than cached.
  p.catch(() => {
    if (cached === p) cached = null;
  });
  return p;
}
