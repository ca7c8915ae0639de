// A node's own file records must say what it offers now: a record from an
// earlier life of the node (peers still hold it after a quick restart) for a
// file it no longer offers is deleted, or pullers keep asking it for a file it
// answers 404 to, and `mesh models` lists it as a holder.
import { describe, expect, test } from "bun:test";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FILE_PREFIX, fileKey, serializeAnnounce } from "../../../src/hydration/files/manifest";
import { FileService } from "../../../src/hydration/files/service";
import { silentLogger } from "../../../src/log";
import { MEMBERSHIP_DEFAULTS } from "../../../src/mesh/membership";
import { meshOf } from "../../mesh/sim-helpers";

const ROUND = MEMBERSHIP_DEFAULTS.roundMs;
const unused = {
  manifest: async () => {
    throw new Error("not asked");
  },
  chunk: async () => {
    throw new Error("not asked");
  },
};
const OLD = {
  name: "old-model",
  aliases: [],
  file: "old-model.gguf",
  size: 4096,
  hash: "a".repeat(64),
  chunkSize: 4096,
  root: "b".repeat(64),
};

function service(id: string, stateDir = "/nonexistent"): FileService {
  return new FileService({ selfId: id, stateDir, uploadLimit: 0, chunkSize: 4096, fetcher: unused, log: silentLogger });
}

/** A mesh where c announced OLD, then restarted at once (before anyone noticed it was gone): b still holds the record. */
async function restarted(attachBeforeJoin: boolean) {
  const c = await meshOf(["a", "b"]);
  c.add("c");
  await c.join("c", "a");
  const identity = c.node("c").identity;
  expect(c.node("c").core.store.put(fileKey(OLD.hash), serializeAnnounce(OLD)).ok).toBe(true);
  expect(await c.clock.until(() => c.node("b").core.store.get(identity.id, fileKey(OLD.hash))?.value != null, 30 * ROUND)).not.toBeNull();
  c.kill("c");
  c.add("c", identity);
  const dir = mkdtempSync(join(tmpdir(), "mesh-stale-"));
  const files = service(identity.id, dir);
  if (attachBeforeJoin) files.attach(c.node("c").core);
  await c.join("c", "a");
  if (!attachBeforeJoin) {
    // The restarted node hears of its old record again from its peers.
    expect(await c.clock.until(() => c.node("c").core.store.get(identity.id, fileKey(OLD.hash))?.value != null, 30 * ROUND)).not.toBeNull();
    files.attach(c.node("c").core);
  }
  // What it offers now stays announced.
  const now = join(dir, "new-model.gguf");
  writeFileSync(now, Buffer.alloc(5000, 7));
  const offered = await files.offer(now, "new-model", []);
  expect(offered).not.toBeNull();
  const bFiles = service(c.node("b").identity.id);
  bFiles.attach(c.node("b").core);
  return { c, identity, bFiles, offered };
}

describe("own file records", () => {
  for (const attachBeforeJoin of [false, true]) {
    test(`a_restarted_node_deletes_the_file_records_of_files_it_no_longer_offers_${attachBeforeJoin ? "heard_after_attach" : "held_at_attach"}`, async () => {
      const { c, identity, bFiles, offered } = await restarted(attachBeforeJoin);
      expect(
        await c.clock.until(
          () =>
            c.node("b").core.store.get(identity.id, fileKey(OLD.hash))?.value === null &&
            bFiles.find("old-model") === null &&
            bFiles.find("new-model")?.holders[0]?.id === identity.id,
          60 * ROUND,
        ),
      ).not.toBeNull();
      const mine = [...c.node("c").core.store.live(FILE_PREFIX)].filter((r) => r.owner === identity.id).map((r) => r.key);
      expect(mine).toEqual([fileKey(offered?.hash ?? "")]);
    });
  }
});
