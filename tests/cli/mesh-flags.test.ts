import { describe, expect, test } from "bun:test";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { advertiseAddr, planMesh } from "../../src/cli/mesh-flags";
import { UsageError } from "../../src/cli/usage";
import { encodeInvite, newCredentials } from "../../src/mesh/invite";

const SECRET = "a mesh secret of at least thirty-two chars";

function usage(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(UsageError);
    return (e as Error).message;
  }
  throw new Error("expected a UsageError");
}

const ifaces = (list: Array<{ address: string; family: "IPv4" | "IPv6"; internal: boolean }>) =>
  ({ eth0: list.map((i) => ({ ...i, netmask: "", mac: "", cidr: null, ...(i.family === "IPv6" ? { scopeid: 0 } : {}) })) }) as never;

describe("mesh flags of mesh serve", () => {
  test("first_node_needs_no_mesh_flags", () => {
    const p = planMesh({ stateDir: "/tmp/x", nodeName: "n1" });
    expect(p).toEqual({ stateDir: "/tmp/x", secret: null, seeds: [], nodeName: "n1", advertise: null, routing: "cache" });
  });

  test("routing_is_cache_or_load_and_nothing_else", () => {
    expect(planMesh({ stateDir: "/tmp/x", nodeName: "n1", routing: "load" }).routing).toBe("load");
    expect(usage(() => planMesh({ stateDir: "/tmp/x", nodeName: "n1", routing: "random" }))).toContain("--routing");
  });

  test("an_invite_token_gives_the_secret_and_seeds", () => {
    const c = newCredentials();
    const p = planMesh({ stateDir: "/tmp/x", join: encodeInvite({ ...c, addrs: ["10.0.0.1:9337", "10.0.0.2:9337"] }) });
    expect(p.secret).toBe(c.secret);
    expect(p.seeds).toEqual(["10.0.0.1:9337", "10.0.0.2:9337"]);
  });

  test("host_port_join_takes_the_secret_from_a_flag_or_a_file", () => {
    expect(planMesh({ stateDir: "/tmp/x", join: "10.0.0.1:9337", meshSecret: SECRET }).secret).toBe(SECRET);
    const file = join(mkdtempSync(join(tmpdir(), "mesh-flags-")), "secret");
    writeFileSync(file, `${SECRET}\n`);
    const p = planMesh({ stateDir: "/tmp/x", join: "10.0.0.1:9337", meshSecretFile: file });
    expect(p.secret).toBe(SECRET);
    expect(p.seeds).toEqual(["10.0.0.1:9337"]);
  });

  test("bad_combinations_are_usage_errors", () => {
    expect(usage(() => planMesh({ join: "10.0.0.1:9337" }))).toContain("needs the mesh secret");
    expect(usage(() => planMesh({ join: "garbage!!" }))).toContain("--join");
    expect(usage(() => planMesh({ meshSecret: "short" }))).toContain("at least 32");
    expect(usage(() => planMesh({ meshSecret: SECRET, meshSecretFile: "/x" }))).toContain("not both");
    expect(usage(() => planMesh({ meshSecretFile: "/nonexistent/secret" }))).toContain("not found");
    const token = encodeInvite({ ...newCredentials(), addrs: ["10.0.0.1:9337"] });
    expect(usage(() => planMesh({ join: token, meshSecret: SECRET }))).toContain("carries the mesh secret");
    expect(usage(() => planMesh({ advertise: "0.0.0.0:9337" }))).toContain("not 0.0.0.0");
    expect(usage(() => planMesh({ advertise: "nohost" }))).toContain("host:port");
    expect(usage(() => planMesh({ nodeName: "has space" }))).toContain("--node-name");
  });
});

describe("advertised address", () => {
  test("is_the_listen_address_when_it_is_specific", () => {
    expect(advertiseAddr(null, "127.0.0.1", 9337)).toBe("127.0.0.1:9337");
    expect(advertiseAddr(null, "::1", 9337)).toBe("[::1]:9337");
    expect(advertiseAddr("node.lan:80", "0.0.0.0", 9337)).toBe("node.lan:80");
  });

  test("on_all_interfaces_is_a_non_loopback_ipv4_address", () => {
    const list = ifaces([
      { address: "127.0.0.1", family: "IPv4", internal: true },
      { address: "fe80::1", family: "IPv6", internal: false },
      { address: "192.168.1.20", family: "IPv4", internal: false },
    ]);
    expect(advertiseAddr(null, "0.0.0.0", 9337, list)).toBe("192.168.1.20:9337");
  });

  test("is_never_0_0_0_0_a_machine_without_a_usable_interface_is_refused", () => {
    const loopbackOnly = ifaces([{ address: "127.0.0.1", family: "IPv4", internal: true }]);
    expect(usage(() => advertiseAddr(null, "0.0.0.0", 9337, loopbackOnly))).toContain("--advertise");
  });
});
