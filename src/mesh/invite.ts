// A mesh's credentials (id + secret) in the node's state dir, and the invite
// token that carries them, with the addresses to join, to another machine.
import { createHmac, randomBytes } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/** What makes a node part of one mesh: its id (a label) and its secret (the key to everything). */
export interface MeshCredentials {
  /** Derived from the secret (meshIdOf), so every node agrees on it without asking. */
  meshId: string;
  /** Text; its UTF-8 bytes are the HMAC key. Generated ones are base64url of 32 random bytes. */
  secret: string;
}

/** An invite: credentials plus where members can be reached ("host:port"). */
export interface Invite extends MeshCredentials {
  addrs: string[];
}

/** Why an invite, a secret or the stored credentials were refused. */
export type InviteErrorCode =
  | "bad_encoding"
  | "bad_version"
  | "missing_field"
  | "bad_field"
  | "weak_secret"
  | "bad_state_file"
  | "mesh_mismatch";

/** A refused invite or credentials file, with a message for a person. */
export interface InviteError {
  ok: false;
  code: InviteErrorCode;
  message: string;
}

/** Success or an InviteError. */
export type InviteResult<T> = { ok: true; value: T } | InviteError;

const VERSION = 1;
const CREDENTIALS_FILE = "mesh.json";
/** Shortest secret accepted from a person: 32 characters (a generated one has 43). */
export const MIN_SECRET_LENGTH = 32;
// A token is pasted on a command line: bound what parsing will look at.
const MAX_TOKEN_LENGTH = 8192;
const MAX_ADDRS = 32;
const ADDR = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/;
const MESH_ID = /^[0-9a-f]{16,64}$/;

function fail(code: InviteErrorCode, message: string): InviteError {
  return { ok: false, code, message };
}

/**
 * The mesh id of a secret: 64 bits of an HMAC, so it names the mesh without
 * revealing anything about the secret. Nodes joining with only host:port and
 * the secret then know the id without asking anyone.
 */
export function meshIdOf(secret: string): string {
  return createHmac("sha256", secret).update("mesh-id-v1").digest().subarray(0, 8).toString("hex");
}

/** Credentials for a secret (e.g. one given with --mesh-secret). */
export function credentialsFor(secret: string): MeshCredentials {
  return { meshId: meshIdOf(secret), secret };
}

/** New credentials: a random 256-bit secret and its mesh id. */
export function newCredentials(): MeshCredentials {
  return credentialsFor(randomBytes(32).toString("base64url"));
}

/** Whether `addr` is "host:port" with a port from 1 to 65535 (e.g. "10.0.0.2:9337", "[fe80::1]:9337"). */
export function isAddr(addr: string): boolean {
  const m = ADDR.exec(addr);
  if (!m) return false;
  const port = Number(m[2]);
  return port >= 1 && port <= 65535;
}

/** Check a secret given by a person (`--mesh-secret`): at least 32 characters, no surrounding spaces. */
export function checkSecret(secret: string): InviteResult<string> {
  if (secret !== secret.trim()) return fail("weak_secret", "the mesh secret must not start or end with spaces");
  if (secret.length < MIN_SECRET_LENGTH) {
    return fail("weak_secret", `the mesh secret must be at least ${MIN_SECRET_LENGTH} characters, got ${secret.length}`);
  }
  return { ok: true, value: secret };
}

/** The copy-pasteable token: base64url of {"v":1,"meshId","secret","addrs"}. */
export function encodeInvite(invite: Invite): string {
  const body = { v: VERSION, meshId: invite.meshId, secret: invite.secret, addrs: invite.addrs.slice(0, MAX_ADDRS) };
  return Buffer.from(JSON.stringify(body)).toString("base64url");
}

/** Parse a token made by encodeInvite, saying exactly what is wrong with a bad one. */
export function parseInvite(token: string): InviteResult<Invite> {
  const t = token.trim();
  if (t.length === 0) return fail("bad_encoding", "the invite token is empty");
  if (t.length > MAX_TOKEN_LENGTH) return fail("bad_encoding", `the invite token is longer than ${MAX_TOKEN_LENGTH} characters`);
  if (!/^[A-Za-z0-9_-]+={0,2}$/.test(t)) return fail("bad_encoding", "the invite token is not base64url (copy the whole line)");
  let body: unknown;
  try {
    body = JSON.parse(Buffer.from(t, "base64url").toString("utf8"));
  } catch {
    return fail("bad_encoding", "the invite token does not decode to an invite (truncated when copied?)");
  }
  if (typeof body !== "object" || body === null || Array.isArray(body))
    return fail("bad_encoding", "the invite token does not hold an invite");
  const b = body as Record<string, unknown>;
  if (b.v === undefined) return fail("missing_field", "the invite token has no version");
  if (b.v !== VERSION)
    return fail("bad_version", `the invite token is version ${JSON.stringify(b.v)}; this mesh understands version ${VERSION}`);
  for (const f of ["meshId", "secret", "addrs"]) if (b[f] === undefined) return fail("missing_field", `the invite token has no ${f}`);
  if (typeof b.meshId !== "string" || !MESH_ID.test(b.meshId)) return fail("bad_field", "the invite token's meshId is not a hex id");
  if (typeof b.secret !== "string") return fail("bad_field", "the invite token's secret is not a string");
  const secret = checkSecret(b.secret);
  if (!secret.ok) return secret;
  if (meshIdOf(b.secret) !== b.meshId)
    return fail("bad_field", "the invite token's meshId does not match its secret (damaged when copied?)");
  if (!Array.isArray(b.addrs) || b.addrs.length === 0) return fail("bad_field", "the invite token lists no addresses");
  if (b.addrs.length > MAX_ADDRS) return fail("bad_field", `the invite token lists more than ${MAX_ADDRS} addresses`);
  for (const a of b.addrs) {
    if (typeof a !== "string" || !isAddr(a)) return fail("bad_field", `the invite token's address ${JSON.stringify(a)} is not host:port`);
  }
  return { ok: true, value: { meshId: b.meshId, secret: b.secret, addrs: b.addrs as string[] } };
}

/** The credentials stored in `stateDir`, null when there are none yet. */
export function loadCredentials(stateDir: string): InviteResult<MeshCredentials | null> {
  const file = join(stateDir, CREDENTIALS_FILE);
  if (!existsSync(file)) return { ok: true, value: null };
  let body: unknown;
  try {
    body = JSON.parse(readFileSync(file, "utf8"));
  } catch {
    return fail("bad_state_file", `${file} is not valid JSON; remove it to create or join a mesh again`);
  }
  const b = (body ?? {}) as Record<string, unknown>;
  if (typeof b.secret !== "string" || !checkSecret(b.secret).ok || b.meshId !== meshIdOf(b.secret)) {
    return fail("bad_state_file", `${file} does not hold mesh credentials; remove it to create or join a mesh again`);
  }
  return { ok: true, value: credentialsFor(b.secret) };
}

/** Store credentials in `stateDir` (created 0700), readable by the owner only (0600); atomic. */
export function saveCredentials(stateDir: string, c: MeshCredentials): void {
  mkdirSync(stateDir, { recursive: true, mode: 0o700 });
  const file = join(stateDir, CREDENTIALS_FILE);
  const tmp = `${file}.${process.pid}.tmp`;
  // Written 0600 from the first byte: a chmod after writing would leave a window where others can read the secret.
  writeFileSync(tmp, `${JSON.stringify({ v: VERSION, meshId: c.meshId, secret: c.secret }, null, 2)}\n`, { mode: 0o600 });
  chmodSync(tmp, 0o600);
  renameSync(tmp, file);
}

/**
 * The credentials this node runs with: the stored ones, or `given` (from --join/--mesh-secret),
 * or new ones for a fresh mesh. Credentials of another mesh than the stored one are refused
 * rather than silently moving the node.
 */
export function resolveCredentials(
  stateDir: string,
  given: MeshCredentials | null,
): InviteResult<{ creds: MeshCredentials; created: boolean }> {
  const stored = loadCredentials(stateDir);
  if (!stored.ok) return stored;
  if (stored.value && given) {
    if (stored.value.secret !== given.secret) {
      return fail(
        "mesh_mismatch",
        `the state dir ${stateDir} belongs to another mesh (${stored.value.meshId}); use another --state-dir to join this one`,
      );
    }
    return { ok: true, value: { creds: stored.value, created: false } };
  }
  if (stored.value) return { ok: true, value: { creds: stored.value, created: false } };
  const creds = given ?? newCredentials();
  saveCredentials(stateDir, creds);
  return { ok: true, value: { creds, created: given === null } };
}
