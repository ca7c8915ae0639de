// `mesh serve --no-console` and `--console`: what the node says at start, and what it serves.
import { expect, test } from "bun:test";
import { clusterDir, spawnNode, waitFor } from "../helpers/cluster";

test("no_console_turns_the_page_and_its_admin_api_off_and_says_so", async () => {
  const dir = clusterDir();
  const n = await spawnNode({ name: "quiet", dir, model: "mesh-tiny", args: ["--no-console"] });
  try {
    await waitFor("the console line", 10_000, async () => n.log().includes("console: off (--no-console)"));
    for (const path of ["/", "/api/requests", "/api/events"]) expect((await fetch(`${n.url}${path}`)).status).toBe(404);
    // The inference API is untouched, and still says where it ran.
    const models = await fetch(`${n.url}/v1/models`);
    expect(models.status).toBe(200);
    expect(models.headers.get("x-mesh-route")).toBe("local");
  } finally {
    n.proc.kill("SIGKILL");
  }
});
