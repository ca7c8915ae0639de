// A node's ed25519 identity: the key that signs everything the node publishes
// (its membership record, its worker records), kept in the node's state dir.
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, type KeyObject, sign, verify } from "node:crypto";
import { chmodSync, existsSync, linkSync, mkdirSync, readFileSync, statSync, unlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { LruMap } from "../lru";
import type { NodeId } from "./wire";

/** A node's key pair; `publicKey` is base64 of the raw 32 bytes, as it travels on the wire. */
export interface Identity {
  id: NodeId;
  publicKey: string;
  /** Signs `data`; returns base64 of the 64-byte signature. */
  sign(data: Uint8Array): string;
}

/** Why the identity could not be loaded or created. */
export type IdentityErrorCode = "state_dir_unusable" | "key_unreadable" | "key_corrupt" | "key_insecure";

/** A refused key file or state dir, with a message for a person. */
export interface IdentityError {
  ok: false;
  code: IdentityErrorCode;
  message: string;
}

/** Success or an IdentityError. */
export type IdentityResult = { ok: true; value: Identity; created: boolean } | IdentityError;

/** The key file's name inside the state dir. */
export const KEY_FILE = "node.key";

// An ed25519 SPKI DER is this fixed 12-byte header followed by the raw 32-byte key.
const SPKI_PREFIX = Buffer.from("302a300506032b6570032100", "hex");
const RAW_KEY_BYTES = 32;
const SIGNATURE_BYTES = 64;
// Public keys seen on the wire are imported once; bounded because peers come and go.
const KEY_CACHE_MAX = 4096;
// LruMaps: a stranger's stream of made-up keys churns them, and a Map's first key slows down after many deletes.
const keyCache = new LruMap<string, KeyObject | null>();
// Every membership update carries a public key whose id is checked: computed once per key.
const idCache = new LruMap<string, NodeId>();
const VERIFIED_MAX = 16_384;
const verified = new LruMap<string, true>();

function fail(code: IdentityErrorCode, message: string): IdentityError {
  return { ok: false, code, message };
}

/** NodeId of a base64 raw public key: hex of the first 16 bytes of its SHA-256, e.g. "3f2a…" (32 chars). */
export function nodeIdOf(publicKeyB64: string): NodeId {
  const hit = idCache.get(publicKeyB64);
  if (hit !== undefined) return hit;
  const id = createHash("sha256").update(Buffer.from(publicKeyB64, "base64")).digest().subarray(0, 16).toString("hex");
  if (idCache.size >= KEY_CACHE_MAX) idCache.shift();
  idCache.set(publicKeyB64, id);
  return id;
}

function publicKeyObject(publicKeyB64: string): KeyObject | null {
  const hit = keyCache.get(publicKeyB64);
  if (hit !== undefined) return hit;
  let key: KeyObject | null = null;
  const raw = Buffer.from(publicKeyB64, "base64");
  if (raw.length === RAW_KEY_BYTES && raw.toString("base64") === publicKeyB64) {
    try {
      key = createPublicKey({ key: Buffer.concat([SPKI_PREFIX, raw]), format: "der", type: "spki" });
    } catch {
      key = null;
    }
  }
  if (keyCache.size >= KEY_CACHE_MAX) keyCache.shift();
  keyCache.set(publicKeyB64, key);
  return key;
}

/** Whether `sigB64` is `publicKeyB64`'s signature over `data`; false for any malformed input. */
export function verifySignature(publicKeyB64: string, data: Uint8Array, sigB64: string): boolean {
  if (typeof publicKeyB64 !== "string" || typeof sigB64 !== "string") return false;
  // The same record reaches a node many times over gossip (and many nodes share a process in the
  // simulation): a good signature is checked once. The key binds key, data and signature together.
  const memo = `${publicKeyB64}/${sigB64}/${createHash("sha256").update(data).digest("base64")}`;
  if (verified.get(memo)) return true;
  const key = publicKeyObject(publicKeyB64);
  if (!key) return false;
  const sig = Buffer.from(sigB64, "base64");
  if (sig.length !== SIGNATURE_BYTES) return false;
  let ok = false;
  try {
    ok = verify(null, data, key, sig);
  } catch {
    ok = false;
  }
  if (ok) {
    if (verified.size >= VERIFIED_MAX) verified.shift();
    verified.set(memo, true);
  }
  return ok;
}

function fromPrivateKey(privateKey: KeyObject): Identity {
  const spki = createPublicKey(privateKey).export({ format: "der", type: "spki" });
  const publicKey = spki.subarray(SPKI_PREFIX.length).toString("base64");
  return {
    id: nodeIdOf(publicKey),
    publicKey,
    sign: (data) => sign(null, data, privateKey).toString("base64"),
  };
}

/** A fresh in-memory identity (simulations and tests; a node uses `loadOrCreateIdentity`). */
export function generateIdentity(): Identity {
  return fromPrivateKey(generateKeyPairSync("ed25519").privateKey);
}

function readKeyFile(file: string): IdentityResult {
  let pem: string;
  try {
    // Like ssh: a private key others can read is refused rather than silently trusted.
    if ((statSync(file).mode & 0o077) !== 0) {
      return fail("key_insecure", `${file} is readable by other users; run: chmod 600 ${file}`);
    }
    pem = readFileSync(file, "utf8");
  } catch (e) {
    return fail("key_unreadable", `cannot read the node key ${file}: ${(e as NodeJS.ErrnoException).code ?? "error"}`);
  }
  try {
    const key = createPrivateKey({ key: pem, format: "pem" });
    if (key.asymmetricKeyType !== "ed25519") return fail("key_corrupt", `${file} holds a ${key.asymmetricKeyType} key, not ed25519`);
    return { ok: true, value: fromPrivateKey(key), created: false };
  } catch {
    return fail("key_corrupt", `${file} is not a PEM ed25519 private key; move it away to create a new identity`);
  }
}

/** Load the node key from `stateDir/node.key`, creating it (mode 0600) on first start, e.g. `loadOrCreateIdentity("~/.local/share/mesh")`. */
export function loadOrCreateIdentity(stateDir: string): IdentityResult {
  const file = join(stateDir, KEY_FILE);
  if (existsSync(file)) return readKeyFile(file);
  const tmp = join(stateDir, `.${KEY_FILE}.${process.pid}.${Date.now()}`);
  try {
    mkdirSync(stateDir, { recursive: true, mode: 0o700 });
    const { privateKey } = generateKeyPairSync("ed25519");
    writeFileSync(tmp, privateKey.export({ format: "pem", type: "pkcs8" }), { mode: 0o600, flag: "wx" });
    chmodSync(tmp, 0o600);
    try {
      // link() fails if the file exists: two nodes starting on one state dir agree on one key.
      linkSync(tmp, file);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
      return readKeyFile(file);
    }
    return { ok: true, value: fromPrivateKey(privateKey), created: true };
  } catch (e) {
    return fail("state_dir_unusable", `cannot create the node key in ${stateDir}: ${(e as NodeJS.ErrnoException).code ?? "error"}`);
  } finally {
    try {
      unlinkSync(tmp);
    } catch {
      // The temporary file may not exist; nothing to clean.
    }
  }
}
