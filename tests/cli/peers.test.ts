import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { nodeClient, writeNodeRecord } from "../../src/cli/node-client";
import { formatPeers } from "../../src/cli/peers";
import { AUTH_HEADER, meshKeys } from "../../src/mesh/auth";
import { MeshClient } from "../../src/mesh/client";
import { newCredentials, saveCredentials } from "../../src/mesh/invite";
import type { PeerRow } from "../../src/server/mesh-routes";
import { meshCli, meshCliAsync } from "../helpers/cluster";
import { challengingServer, meshOnlyServer, TEST_MESH_ID } from "../helpers/mesh";

const closeAfter: Array<() => unknown> = [];

afterAll(async () => {
  for (const c of closeAfter) await c();
});

function row(o: Partial<PeerRow>): PeerRow {
  return {
    id: "0123456789abcdef0123456789abcdef",
    name: "n",
    addr: "10.0.0.1:9337",
    state: "alive",
    incarnation: 0,
    last_seen_ms: 400,
    rtt_ms: 1.4,
    self: false,
    models: [],
    slots_busy: 0,
    slots_total: 0,
    kv_used: 0,
    kv_cached: 0,
    kv_total: 0,
    queue_depth: 0,
    workers: [],
    ...o,
  };
}

describe("mesh peers", () => {
  test("table_shows_every_column_with_this_node_marked", () => {
    const out = formatPeers({
      mesh_id: "feedfacefeedface",
      node_id: "0123",
      forwarding: { forwarded: 0, retried: 0, failed: 0, active: 0 },
      members: [
        row({
          name: "alpha",
          self: true,
          last_seen_ms: null,
          rtt_ms: null,
          models: ["qwen"],
          slots_busy: 1,
          slots_total: 4,
          kv_used: 512,
          kv_cached: 1536,
          kv_total: 2048,
        }),
        row({ id: "ffff0000ffff0000", name: "beta", addr: "10.0.0.2:9337", state: "suspect", incarnation: 3, last_seen_ms: 65_000 }),
      ],
    });
    const lines = out.split("\n");
    expect(lines[0]).toBe("mesh feedfacefeedface: 1 of 2 members alive");
    expect(lines[1]).toMatch(/^NODE\s+NAME\s+ADDRESS\s+STATE\s+INC\s+LAST SEEN\s+MODELS\s+SLOTS\s+KV USED\s+CACHED\s+RTT$/);
    expect(lines[2]).toMatch(/^01234567\*\s+alpha\s+10\.0\.0\.1:9337\s+alive\s+0\s+-\s+qwen\s+1\/4\s+25%\s+75%\s+-$/);
    expect(lines[3]).toMatch(/^ffff0000\s+beta\s+10\.0\.0\.2:9337\s+suspect\s+3\s+65s ago\s+-\s+-\s+-\s+-\s+1ms$/);
  });

  test("a_models_aliases_are_shown_beside_it", () => {
    const out = formatPeers({
      mesh_id: "feedfacefeedface",
      node_id: "0123",
      forwarding: { forwarded: 0, retried: 0, failed: 0, active: 0 },
      members: [
        row({ self: true, models: ["qwen", "llama"], aliases: { qwen: ["gpt-4o", "gpt-4"] } }),
        row({ name: "old", models: ["phi"] }),
      ],
    });
    const lines = out.split("\n");
    expect(lines[2]).toContain(" qwen (gpt-4o,gpt-4),llama ");
    expect(lines[3]).toContain(" phi ");
  });

  test("routing_is_shown_under_the_table", () => {
    const out = formatPeers({
      mesh_id: "feedfacefeedface",
      node_id: "0123",
      forwarding: { forwarded: 0, retried: 0, failed: 0, active: 0 },
      members: [row({ self: true })],
      routing: {
        mode: "cache",
        decisions: { byReason: { cache: 12, load: 3, only: 1, local: 5 }, toSelf: 9, toPeer: 12, viaLease: 2 },
        index: [{ model: "qwen", entries: 1234, bytes: 200_000, budget_evictions: 0 }],
        sync: { bytesLastRound: 2150, bytesSent: 3 * 1024 * 1024, unresolved: 4, pendingOps: 7 } as never,
      },
    });
    const lines = out.split("\n");
    expect(lines).toContain("routing: cache-aware; decisions by cache 12, by load 3, only candidate 1, local 5; ran here 9, on peers 12");
    expect(lines).toContain("index: qwen 1234 prefixes (195.3 KiB)");
    expect(lines).toContain("sync: 2.1 KiB last round, 3.0 MiB in all; 4 unresolved hashes; 7 changes pending");
  });

  test("no_node_running_is_one_line_and_exit_1", () => {
    const state = mkdtempSync(join(tmpdir(), "mesh-peers-"));
    saveCredentials(state, newCredentials());
    const probe = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response() });
    const port = probe.port;
    probe.stop(true);
    const r = meshCli(["peers", "--state-dir", state, "--url", `http://127.0.0.1:${port}`]);
    expect(r.code).toBe(1);
    expect(r.err.trim().split("\n")).toEqual([
      `mesh: no mesh node is running at http://127.0.0.1:${port} (start one with 'mesh serve', or pass --url)`,
    ]);
  });

  test("a_node_of_the_mesh_is_believed_and_its_table_printed", async () => {
    const creds = newCredentials();
    const state = mkdtempSync(join(tmpdir(), "mesh-peers-"));
    saveCredentials(state, creds);
    const node = meshOnlyServer("abcd", creds.secret);
    closeAfter.push(() => node.close());
    const r = await meshCliAsync(["peers", "--state-dir", state, "--url", node.url]);
    expect(r.err).toBe("");
    expect(r.code).toBe(0);
    expect(r.out).toContain(`mesh ${TEST_MESH_ID}: 0 of 0 members alive`);
  });

  test("an_answer_without_the_nodes_reply_proof_is_one_line_and_exit_1", async () => {
    const state = mkdtempSync(join(tmpdir(), "mesh-peers-"));
    saveCredentials(state, newCredentials());
    // Whatever took the node's port: it hands out nonces and answers /api/peers, but cannot prove the answer.
    const report = {
      mesh_id: "feedfacefeedface",
      node_id: "x",
      members: [],
      forwarding: { forwarded: 0, retried: 0, failed: 0, active: 0 },
    };
    const fake = challengingServer(() => Response.json(report, { headers: { "x-mesh-reply-proof": "A".repeat(43) } }));
    closeAfter.push(() => fake.stop(true));
    const url = `http://127.0.0.1:${fake.port}`;
    const r = await meshCliAsync(["peers", "--state-dir", state, "--url", url]);
    expect(r.code).toBe(1);
    expect(r.out).toBe("");
    expect(r.err.trim().split("\n")).toEqual([
      `mesh: the answer at ${url} has no valid mesh proof (HTTP 200): whatever listens there is not a node of the mesh in ${state}`,
    ]);
  });

  test("a_recorded_answer_replayed_under_its_recorded_nonce_is_one_line_and_exit_1", async () => {
    const creds = newCredentials();
    const state = mkdtempSync(join(tmpdir(), "mesh-peers-"));
    saveCredentials(state, creds);
    const node = meshOnlyServer("abcd", creds.secret);
    closeAfter.push(() => node.close());
    // One genuine exchange, as anyone on the network could record it (traffic is not encrypted).
    const recorded = await new MeshClient({ keys: meshKeys(creds.secret), nodeId: "cli-0000" }).send(
      `127.0.0.1:${node.port}`,
      "GET",
      "/api/peers",
      new Uint8Array(),
    );
    const body = await recorded.response.text();
    const proof = recorded.response.headers.get(AUTH_HEADER.replyProof) ?? "";
    expect(recorded.response.status).toBe(200);
    // Later, on the node's port: the recorded nonce as its challenge, then the recorded answer and proof.
    const replayer = challengingServer(
      () => new Response(body, { headers: { "content-type": "application/json", [AUTH_HEADER.replyProof]: proof } }),
      recorded.nonce,
    );
    closeAfter.push(() => replayer.stop(true));
    const url = `http://127.0.0.1:${replayer.port}`;
    const r = await meshCliAsync(["peers", "--state-dir", state, "--url", url]);
    expect(r.code).toBe(1);
    expect(r.out).toBe("");
    expect(r.err.trim().split("\n")).toEqual([
      `mesh: the answer at ${url} has no valid mesh proof (HTTP 200): whatever listens there is not a node of the mesh in ${state}`,
    ]);
  });

  test("a_refusal_of_the_credentials_says_it_may_be_another_mesh_or_no_mesh_node_at_all", async () => {
    const state = mkdtempSync(join(tmpdir(), "mesh-peers-"));
    saveCredentials(state, newCredentials());
    // A node of another mesh, and something that is no mesh node but answers 401: the CLI cannot tell them apart.
    const other = meshOnlyServer("abcd", newCredentials().secret);
    closeAfter.push(() => other.close());
    const fake = challengingServer(() => Response.json({ error: { message: "nope" } }, { status: 401 }));
    closeAfter.push(() => fake.stop(true));
    for (const url of [other.url, `http://127.0.0.1:${fake.port}`]) {
      const r = await meshCliAsync(["peers", "--state-dir", state, "--url", url]);
      expect(r.code).toBe(1);
      expect(r.out).toBe("");
      expect(r.err.trim().split("\n")).toEqual([
        `mesh: ${url} refused the mesh credentials in ${state}: it is a node of another mesh, or not a mesh node at all`,
      ]);
    }
  });

  test("no_credentials_is_one_line_and_exit_1", () => {
    const r = meshCli(["peers", "--state-dir", mkdtempSync(join(tmpdir(), "mesh-peers-"))]);
    expect(r.code).toBe(1);
    expect(r.err).toContain("no mesh credentials");
    expect(r.err.trim().split("\n").length).toBe(1);
  });

  test("bad_flags_are_one_line_and_exit_2", () => {
    const state = mkdtempSync(join(tmpdir(), "mesh-peers-"));
    saveCredentials(state, newCredentials());
    for (const [args, needle] of [
      [["peers", "--bogus"], "unknown option"],
      [["peers", "--state-dir", state, "--watch", "0"], "--watch"],
      [["peers", "--state-dir", state, "--url", "ftp://x"], "--url"],
      [["serve", "--join", "10.0.0.1:9337"], "mesh secret"],
      [["serve", "--mesh-secret", "short"], "at least 32"],
      [["serve", "--advertise", "0.0.0.0:1"], "0.0.0.0"],
    ] as Array<[string[], string]>) {
      const r = meshCli(args);
      expect(r.code).toBe(2);
      expect(r.err).toContain(needle);
      expect(r.err.trim().split("\n").length).toBe(1);
    }
  });
});

describe("mesh peers through a relay", () => {
  test("a_relay_on_the_recorded_nodes_port_cannot_pass_the_request_to_another_node", async () => {
    const creds = newCredentials();
    const state = mkdtempSync(join(tmpdir(), "mesh-peers-"));
    saveCredentials(state, creds);
    const other = meshOnlyServer("0ther", creds.secret);
    closeAfter.push(() => other.close());
    // Whatever took the recorded node's port, without the secret: it passes every request, headers and all, to a live node.
    const relay = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      fetch: async (r) => {
        const u = new URL(r.url);
        const res = await fetch(`${other.url}${u.pathname}${u.search}`, { method: r.method, headers: r.headers });
        return new Response(await res.arrayBuffer(), { status: res.status, headers: res.headers });
      },
    });
    closeAfter.push(() => relay.stop(true));
    const url = `http://127.0.0.1:${relay.port}`;
    writeNodeRecord(state, { url, addr: `127.0.0.1:${relay.port}`, pid: 1, id: "d3ad" });
    const err = await nodeClient({ stateDir: state })
      .get("/mesh/info")
      .catch((e: Error) => e);
    expect(err).toBeInstanceOf(Error);
    expect((err as Error).message).toContain("refused the mesh credentials");
  });
});
