import { describe, expect, test } from "bun:test";
import { chmodSync, mkdtempSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { generateIdentity, KEY_FILE, loadOrCreateIdentity, nodeIdOf, verifySignature } from "../../src/mesh/identity";

const stateDir = () => join(mkdtempSync(join(tmpdir(), "mesh-id-")), "state");
const bytes = (s: string) => new TextEncoder().encode(s);

describe("node identity", () => {
  test("first_start_creates_an_owner_only_key_and_later_starts_reuse_it", () => {
    const dir = stateDir();
    const first = loadOrCreateIdentity(dir);
    if (!first.ok) throw new Error(first.message);
    expect(first.created).toBe(true);
    expect(statSync(join(dir, KEY_FILE)).mode & 0o777).toBe(0o600);
    const again = loadOrCreateIdentity(dir);
    if (!again.ok) throw new Error(again.message);
    expect(again.created).toBe(false);
    expect(again.value.id).toBe(first.value.id);
    expect(again.value.publicKey).toBe(first.value.publicKey);
  });

  test("node_id_is_the_first_16_bytes_of_sha256_of_the_raw_public_key", () => {
    const id = generateIdentity();
    expect(Buffer.from(id.publicKey, "base64")).toHaveLength(32);
    const expected = new Bun.CryptoHasher("sha256").update(Buffer.from(id.publicKey, "base64")).digest("hex").slice(0, 32);
    expect(id.id).toBe(expected);
    expect(nodeIdOf(id.publicKey)).toBe(expected);
  });

  test("signatures_verify_only_with_the_signers_key_and_the_same_bytes", () => {
    const a = generateIdentity();
    const b = generateIdentity();
    const sig = a.sign(bytes("hello"));
    expect(verifySignature(a.publicKey, bytes("hello"), sig)).toBe(true);
    expect(verifySignature(b.publicKey, bytes("hello"), sig)).toBe(false);
    expect(verifySignature(a.publicKey, bytes("hellO"), sig)).toBe(false);
    expect(verifySignature(a.publicKey, bytes("hello"), "AAAA")).toBe(false);
    expect(verifySignature("not a key", bytes("hello"), sig)).toBe(false);
  });

  test("corrupt_key_file_is_refused_with_a_code_and_left_in_place", () => {
    const dir = stateDir();
    const made = loadOrCreateIdentity(dir);
    if (!made.ok) throw new Error(made.message);
    writeFileSync(join(dir, KEY_FILE), "garbage", { mode: 0o600 });
    const r = loadOrCreateIdentity(dir);
    expect(r.ok).toBe(false);
    if (!r.ok) {
      expect(r.code).toBe("key_corrupt");
      expect(r.message).toContain(KEY_FILE);
    }
    expect(readFileSync(join(dir, KEY_FILE), "utf8")).toBe("garbage");
  });

  test("key_file_readable_by_others_is_refused", () => {
    const dir = stateDir();
    loadOrCreateIdentity(dir);
    chmodSync(join(dir, KEY_FILE), 0o644);
    const r = loadOrCreateIdentity(dir);
    expect(r.ok ? "ok" : r.code).toBe("key_insecure");
  });

  test("unreadable_key_file_is_refused_with_a_code", () => {
    const dir = stateDir();
    loadOrCreateIdentity(dir);
    chmodSync(join(dir, KEY_FILE), 0o000);
    const r = loadOrCreateIdentity(dir);
    // Root reads anything: then the file is simply loaded.
    if (process.getuid?.() === 0) expect(r.ok).toBe(true);
    else expect(r.ok ? "ok" : r.code).toBe("key_unreadable");
  });

  test("state_dir_that_cannot_be_created_is_refused_with_a_code", () => {
    const file = join(mkdtempSync(join(tmpdir(), "mesh-id-")), "a-file");
    writeFileSync(file, "x");
    const r = loadOrCreateIdentity(join(file, "state"));
    expect(r.ok ? "ok" : r.code).toBe("state_dir_unusable");
  });
});
