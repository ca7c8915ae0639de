import { expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BENCH, buildModel, generateModel, TINY } from "../../src/gguf/generate";
import { vocabPath } from "../../src/gguf/models";
import { parseGguf, readGgufHeader } from "../../src/gguf/read";
import { GgmlType, type GgufValue, GgufValueType } from "../../src/gguf/types";
import { encodeHeader, type TensorSpec, tensorBytes, writeGguf } from "../../src/gguf/write";

test("written_metadata_and_tensors_read_back_unchanged", async () => {
  const dir = mkdtempSync(join(tmpdir(), "mesh-gguf-"));
  try {
    const path = join(dir, "t.gguf");
    const metadata = new Map<string, GgufValue>([
      ["general.architecture", { type: GgufValueType.STRING, value: "llama" }],
      ["x.u32", { type: GgufValueType.UINT32, value: 7 }],
      ["x.f32", { type: GgufValueType.FLOAT32, value: 0.5 }],
      ["x.arr", { type: GgufValueType.ARRAY, itemType: GgufValueType.STRING, value: ["a", "é", ""] }],
      ["x.bool", { type: GgufValueType.BOOL, value: true }],
    ]);
    const data = new Uint8Array(tensorBytes({ dims: [3, 2], type: GgmlType.F32 })).fill(9);
    await writeGguf(path, metadata, [{ name: "w", dims: [3, 2], type: GgmlType.F32, data: () => [data] }]);
    const h = await readGgufHeader(path);
    expect(h.version).toBe(3);
    expect([...h.metadata.keys()]).toEqual([...metadata.keys()]);
    expect(h.metadata.get("x.arr")?.value).toEqual(["a", "é", ""]);
    expect(h.metadata.get("x.f32")?.value).toBe(0.5);
    expect(h.tensors).toEqual([{ name: "w", dims: [3, 2], type: GgmlType.F32, offset: 0n }]);
    const file = readFileSync(path);
    expect(file.subarray(h.dataOffset, h.dataOffset + 24)).toEqual(Buffer.from(data));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("rejects_a_file_that_is_not_gguf_with_a_clear_reason", () => {
  expect(() => parseGguf(new TextEncoder().encode("PK\x03\x04 definitely a zip"))).toThrow("not a GGUF file");
  const header = encodeHeader(new Map(), []);
  expect(() => parseGguf(header.subarray(0, 10))).toThrow("truncated");
});

test("random_model_is_deterministic_for_a_seed_and_says_its_weights_are_random", async () => {
  const vocab = vocabPath("phi-3");
  expect(vocab).not.toBeNull();
  const dir = mkdtempSync(join(tmpdir(), "mesh-gen-"));
  try {
    const spec = { ...TINY, nLayer: 1 };
    await generateModel(spec, vocab as string, join(dir, "a.gguf"));
    await generateModel(spec, vocab as string, join(dir, "b.gguf"));
    const hash = (p: string) => createHash("sha256").update(readFileSync(p)).digest("hex");
    expect(hash(join(dir, "a.gguf"))).toBe(hash(join(dir, "b.gguf")));
    const h = await readGgufHeader(join(dir, "a.gguf"));
    expect(h.metadata.get("mesh.random_weights")?.value).toBe(true);
    expect(h.metadata.get("tokenizer.chat_template")?.value).toBeString();
    const other = buildModel({ ...spec, seed: 99 }, readFileSync(vocab as string));
    expect(other.metadata.get("mesh.seed")?.value).toBe(99);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("bench_model_has_the_specified_shape_about_156m_parameters_in_f16", () => {
  const m = buildModel(BENCH, readFileSync(vocabPath("llama-spm") as string));
  const u32 = (k: string) => m.metadata.get(k)?.value;
  expect([u32("llama.block_count"), u32("llama.embedding_length"), u32("llama.attention.head_count")]).toEqual([8, 1024, 16]);
  expect([u32("llama.attention.head_count_kv"), u32("llama.feed_forward_length"), u32("llama.vocab_size")]).toEqual([4, 2816, 32000]);
  const params = m.tensors.reduce((sum, t) => sum + t.dims.reduce((a, b) => a * b, 1), 0);
  expect(params).toBeGreaterThan(155e6);
  expect(params).toBeLessThan(157e6);
  // Untied output projection, every matrix F16: 297 MiB of weights (the file adds the vocabulary).
  expect(m.tensors.some((t) => t.name === "output.weight")).toBe(true);
  const bytes = m.tensors.reduce((sum, t) => sum + t.dims.reduce((a, b) => a * b, 1) * (t.type === GgmlType.F16 ? 2 : 4), 0);
  expect(Math.round(bytes / 2 ** 20)).toBe(297);
});

test("the_seed_decides_the_weights_not_only_the_metadata", () => {
  const vocab = readFileSync(vocabPath("phi-3") as string);
  const firstChunk = (seed: number) => {
    const embd = buildModel({ ...TINY, seed }, vocab).tensors[0] as TensorSpec;
    const chunk = embd.data()[Symbol.iterator]().next().value as Uint8Array;
    return createHash("sha256").update(chunk).digest("hex");
  };
  expect(firstChunk(1)).toBe(firstChunk(1));
  expect(firstChunk(99)).not.toBe(firstChunk(1));
});
