import { describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  checkSecret,
  encodeInvite,
  loadCredentials,
  meshIdOf,
  newCredentials,
  parseInvite,
  resolveCredentials,
  saveCredentials,
} from "../../src/mesh/invite";

const b64 = (v: unknown) => Buffer.from(JSON.stringify(v)).toString("base64url");
const secret = "s".repeat(43);
const good = { v: 1, meshId: meshIdOf(secret), secret, addrs: ["10.0.0.2:9337"] };

describe("invite tokens", () => {
  test("round_trips_credentials_and_addresses", () => {
    const c = newCredentials();
    const token = encodeInvite({ ...c, addrs: ["10.0.0.2:9337", "[fe80::1]:9400", "node-b.lan:1"] });
    expect(token).toMatch(/^[A-Za-z0-9_-]+$/);
    const r = parseInvite(`  ${token}\n`);
    expect(r).toEqual({ ok: true, value: { ...c, addrs: ["10.0.0.2:9337", "[fe80::1]:9400", "node-b.lan:1"] } });
  });

  test("the_mesh_id_follows_from_the_secret_and_reveals_nothing_of_it", () => {
    expect(meshIdOf(secret)).toBe(meshIdOf(secret));
    expect(meshIdOf(secret)).not.toBe(meshIdOf(`${secret}x`));
    expect(meshIdOf(secret)).toMatch(/^[0-9a-f]{16}$/);
  });

  test("new_credentials_are_random_and_strong", () => {
    const a = newCredentials();
    const b = newCredentials();
    expect(a.meshId).not.toBe(b.meshId);
    expect(a.secret).not.toBe(b.secret);
    expect(Buffer.from(a.secret, "base64url").length).toBe(32);
  });

  test("bad_tokens_get_a_clear_error_code", () => {
    const cases: Array<[string, string, string]> = [
      ["", "bad_encoding", "empty"],
      ["not base64!", "bad_encoding", "base64url"],
      [Buffer.from("{not json").toString("base64url"), "bad_encoding", "does not decode"],
      [b64([1, 2]), "bad_encoding", "does not hold"],
      [b64({ ...good, v: 2 }), "bad_version", "version 2"],
      [b64({ meshId: good.meshId, secret: good.secret, addrs: good.addrs }), "missing_field", "no version"],
      [b64({ v: 1, secret: good.secret, addrs: good.addrs }), "missing_field", "meshId"],
      [b64({ v: 1, meshId: good.meshId, addrs: good.addrs }), "missing_field", "secret"],
      [b64({ v: 1, meshId: good.meshId, secret: good.secret }), "missing_field", "addrs"],
      [b64({ ...good, meshId: "XYZ" }), "bad_field", "meshId"],
      [b64({ ...good, meshId: "0123456789abcdef" }), "bad_field", "does not match"],
      [b64({ ...good, secret: "short" }), "weak_secret", "at least 32"],
      [b64({ ...good, addrs: [] }), "bad_field", "no addresses"],
      [b64({ ...good, addrs: ["0.0.0.0"] }), "bad_field", "host:port"],
      [b64({ ...good, addrs: ["h:99999"] }), "bad_field", "host:port"],
      [b64({ ...good, addrs: [7] }), "bad_field", "host:port"],
      ["A".repeat(9000), "bad_encoding", "longer than"],
    ];
    for (const [token, code, needle] of cases) {
      const r = parseInvite(token);
      expect(r.ok).toBe(false);
      if (!r.ok) {
        expect(r.code).toBe(code as never);
        expect(r.message).toContain(needle);
      }
    }
  });

  test("secret_from_a_person_must_be_long_and_unpadded", () => {
    expect(checkSecret("x".repeat(32)).ok).toBe(true);
    expect(checkSecret("x".repeat(31)).ok).toBe(false);
    expect(checkSecret(` ${"x".repeat(40)}`).ok).toBe(false);
  });
});

describe("credentials in the state dir", () => {
  test("are_written_owner_only_and_read_back", () => {
    const dir = join(mkdtempSync(join(tmpdir(), "mesh-inv-")), "state");
    const c = newCredentials();
    saveCredentials(dir, c);
    expect(statSync(join(dir, "mesh.json")).mode & 0o777).toBe(0o600);
    expect(statSync(dir).mode & 0o777).toBe(0o700);
    expect(loadCredentials(dir)).toEqual({ ok: true, value: c });
  });

  test("first_start_creates_a_mesh_and_later_starts_keep_it", () => {
    const dir = mkdtempSync(join(tmpdir(), "mesh-inv-"));
    const first = resolveCredentials(dir, null);
    expect(first.ok && first.value.created).toBe(true);
    const again = resolveCredentials(dir, null);
    expect(again.ok && again.value.created).toBe(false);
    if (first.ok && again.ok) expect(again.value.creds).toEqual(first.value.creds);
  });

  test("joining_stores_the_given_mesh", () => {
    const dir = mkdtempSync(join(tmpdir(), "mesh-inv-"));
    const given = newCredentials();
    const r = resolveCredentials(dir, given);
    expect(r.ok && !r.value.created && r.value.creds.secret === given.secret).toBe(true);
    expect(loadCredentials(dir)).toEqual({ ok: true, value: given });
  });

  test("another_mesh_on_a_used_state_dir_is_refused_and_changes_nothing", () => {
    const dir = mkdtempSync(join(tmpdir(), "mesh-inv-"));
    const mine = newCredentials();
    saveCredentials(dir, mine);
    const before = readFileSync(join(dir, "mesh.json"), "utf8");
    const r = resolveCredentials(dir, newCredentials());
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.code).toBe("mesh_mismatch");
    expect(readFileSync(join(dir, "mesh.json"), "utf8")).toBe(before);
  });

  test("a_corrupt_credentials_file_is_refused_not_replaced", () => {
    const dir = mkdtempSync(join(tmpdir(), "mesh-inv-"));
    writeFileSync(join(dir, "mesh.json"), "{oops");
    const r = resolveCredentials(dir, null);
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.code).toBe("bad_state_file");
    expect(readFileSync(join(dir, "mesh.json"), "utf8")).toBe("{oops");
  });
});
