import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { isLoopbackAddr } from "../../src/cli/invite";
import { writeNodeRecord } from "../../src/cli/node-client";
import { type MeshCredentials, newCredentials, parseInvite, saveCredentials } from "../../src/mesh/invite";
import type { RunningServer } from "../../src/server";
import { meshCliAsync } from "../helpers/cluster";
import { challengingServer, closedPort, meshOnlyServer } from "../helpers/mesh";

const closeAfter: Array<() => unknown> = [];

afterAll(async () => {
  for (const c of closeAfter) await c();
});

function stateWith(creds: MeshCredentials): string {
  const dir = mkdtempSync(join(tmpdir(), "mesh-invite-"));
  saveCredentials(dir, creds);
  return dir;
}

/** A running node of the mesh of `creds` (no model: only its mesh routes matter) that advertises `addrs(port)`. */
function node(creds: MeshCredentials, addrs: (port: number) => string[]): RunningServer {
  let port = 0;
  const server = meshOnlyServer("abcd", creds.secret, (h) => ({
    ...h,
    service: { ...h.service, info: () => ({ mesh_id: creds.meshId, node_id: "abcd", name: "n", addrs: addrs(port) }) },
  }));
  port = server.port;
  closeAfter.push(() => server.close());
  return server;
}

describe("mesh invite", () => {
  test("a_running_node_on_loopback_prints_its_token_and_warns_that_other_machines_cannot_use_it", async () => {
    const creds = newCredentials();
    const n = node(creds, (port) => [`127.0.0.1:${port}`]);
    const r = await meshCliAsync(["invite", "--state-dir", stateWith(creds), "--url", n.url]);
    expect(r.code).toBe(0);
    const parsed = parseInvite(r.out.trim());
    if (!parsed.ok) throw new Error(parsed.message);
    expect(parsed.value).toEqual({ ...creds, addrs: [`127.0.0.1:${n.port}`] });
    const lines = r.err.trim().split("\n");
    expect(lines.length).toBe(1);
    expect(lines[0]).toContain("other machines cannot use it");
    expect(lines[0]).toContain("--advertise");
    expect(lines[0]).toContain("--host");
  });

  test("a_node_with_a_reachable_address_prints_its_token_without_a_warning", async () => {
    const creds = newCredentials();
    const n = node(creds, (port) => ["10.1.2.3:9337", `127.0.0.1:${port}`]);
    const r = await meshCliAsync(["invite", "--state-dir", stateWith(creds), "--url", n.url]);
    expect(r.code).toBe(0);
    const parsed = parseInvite(r.out.trim());
    expect(parsed.ok && parsed.value.addrs).toEqual(["10.1.2.3:9337", `127.0.0.1:${n.port}`]);
    expect(r.err).toBe("");
  });

  test("a_node_that_is_not_running_is_one_line_and_exit_1_and_no_token", async () => {
    const state = stateWith(newCredentials());
    // The node ran once: its record names an address where nothing listens now.
    const port = await closedPort();
    writeNodeRecord(state, { url: `http://127.0.0.1:${port}`, addr: `10.9.8.7:${port}`, pid: 1 });
    const r = await meshCliAsync(["invite", "--state-dir", state]);
    expect(r.code).toBe(1);
    expect(r.out).toBe("");
    expect(r.err.trim().split("\n")).toEqual([
      `mesh: no mesh node is running at http://127.0.0.1:${port} (start one with 'mesh serve', or pass --url)`,
    ]);
  });

  test("whatever_listens_on_the_nodes_port_without_the_secret_gets_no_token_printed", async () => {
    const creds = newCredentials();
    // Answers like a node, with nonces and /mesh/info, but cannot prove its answers.
    const fake = challengingServer(() => Response.json({ mesh_id: creds.meshId, node_id: "abcd", name: "n", addrs: ["10.6.6.6:9337"] }));
    closeAfter.push(() => fake.stop(true));
    const r = await meshCliAsync(["invite", "--state-dir", stateWith(creds), "--url", `http://127.0.0.1:${fake.port}`]);
    expect(r.code).toBe(1);
    expect(r.out).toBe("");
    const lines = r.err.trim().split("\n");
    expect(lines.length).toBe(1);
    expect(lines[0]).toContain("no valid mesh proof");
  });

  test("loopback_addresses_are_told_from_others", () => {
    for (const a of ["127.0.0.1:9337", "127.1.2.3:1", "[::1]:9337", "localhost:80", "[::ffff:127.0.0.1]:9337"]) {
      expect(isLoopbackAddr(a)).toBe(true);
    }
    for (const a of ["10.0.0.2:9337", "192.168.1.5:9337", "[fe80::1]:9337", "node.lan:9337", "128.0.0.1:1"]) {
      expect(isLoopbackAddr(a)).toBe(false);
    }
  });
});
