// File records and manifests from peers are untrusted: each field is checked,
// a record is bound to the hash it is filed under, a manifest to the root.
import { describe, expect, test } from "bun:test";
import { chunkHash } from "../../../src/hydration/files/hash";
import {
  checkManifest,
  type FileAnnounce,
  fileKey,
  MAX_CHUNKS,
  parseAnnounce,
  rootOf,
  serializeAnnounce,
} from "../../../src/hydration/files/manifest";

const chunks = [chunkHash(Buffer.from("a")), chunkHash(Buffer.from("b"))];
const good: FileAnnounce = {
  name: "qwen",
  aliases: ["gpt-4o"],
  file: "qwen.gguf",
  size: 4096 + 10,
  hash: chunkHash(Buffer.from("whole")),
  chunkSize: 4096,
  root: rootOf(chunks),
};

describe("file records", () => {
  test("round_trips_a_record_filed_under_its_hash", () => {
    expect(parseAnnounce(fileKey(good.hash), serializeAnnounce(good))).toEqual(good);
  });

  test("refuses_a_record_filed_under_another_hash", () => {
    expect(parseAnnounce(fileKey(chunkHash(Buffer.from("other"))), serializeAnnounce(good))).toBeNull();
  });

  test("refuses_file_names_that_are_paths", () => {
    for (const file of ["../etc/passwd", "a/b.gguf", ".hidden", "..", "", "x".repeat(300)]) {
      expect(parseAnnounce(fileKey(good.hash), serializeAnnounce({ ...good, file }))).toBeNull();
    }
  });

  test("refuses_chunk_sizes_and_counts_out_of_bounds", () => {
    expect(parseAnnounce(fileKey(good.hash), serializeAnnounce({ ...good, chunkSize: 100 }))).toBeNull();
    expect(parseAnnounce(fileKey(good.hash), serializeAnnounce({ ...good, size: 4096 * (MAX_CHUNKS + 1) }))).toBeNull();
    expect(parseAnnounce(fileKey(good.hash), "not json")).toBeNull();
  });
});

describe("manifests", () => {
  test("accepts_the_chunk_list_whose_root_the_record_signed", () => {
    expect(checkManifest({ hash: good.hash, size: good.size, chunkSize: 4096, chunks }, good)?.chunks).toEqual(chunks);
  });

  test("refuses_a_chunk_list_that_does_not_match_the_root", () => {
    const other = [chunks[1], chunks[0]];
    expect(checkManifest({ hash: good.hash, size: good.size, chunkSize: 4096, chunks: other }, good)).toBeNull();
    expect(checkManifest({ hash: good.hash, size: good.size, chunkSize: 4096, chunks: [chunks[0]] }, good)).toBeNull();
    expect(checkManifest({ hash: good.hash, size: good.size + 1, chunkSize: 4096, chunks }, good)).toBeNull();
  });
});
