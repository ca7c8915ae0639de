import { open } from "node:fs/promises";
import { GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GgmlType, type GgufValue, GgufValueType } from "./types";

/** A tensor to write: its data is produced in chunks so a large model never sits in memory whole. */
export interface TensorSpec {
  name: string;
  /** Dimensions innermost first. */
  dims: number[];
  type: GgmlType;
  /** Yields the tensor's bytes in order; the total must equal its size. */
  data: () => Iterable<Uint8Array>;
}

const TYPE_SIZE: Record<GgmlType, number> = { [GgmlType.F32]: 4, [GgmlType.F16]: 2 };

/** Byte size of a tensor of the given type and shape. */
export function tensorBytes(t: Pick<TensorSpec, "dims" | "type">): number {
  return t.dims.reduce((a, b) => a * b, 1) * TYPE_SIZE[t.type];
}

/** Little-endian bytes of one non-string scalar metadata value. */
function encodeScalar(type: GgufValueType, v: number | bigint | string | boolean): Uint8Array {
  const b8 = new Uint8Array(8);
  const dv = new DataView(b8.buffer);
  switch (type) {
    case GgufValueType.UINT8:
      return Uint8Array.of(Number(v));
    case GgufValueType.INT8:
      dv.setInt8(0, Number(v));
      return b8.slice(0, 1);
    case GgufValueType.UINT16:
      dv.setUint16(0, Number(v), true);
      return b8.slice(0, 2);
    case GgufValueType.INT16:
      dv.setInt16(0, Number(v), true);
      return b8.slice(0, 2);
    case GgufValueType.UINT32:
      dv.setUint32(0, Number(v), true);
      return b8.slice(0, 4);
    case GgufValueType.INT32:
      dv.setInt32(0, Number(v), true);
      return b8.slice(0, 4);
    case GgufValueType.FLOAT32:
      dv.setFloat32(0, Number(v), true);
      return b8.slice(0, 4);
    case GgufValueType.BOOL:
      return Uint8Array.of(v ? 1 : 0);
    case GgufValueType.UINT64:
      dv.setBigUint64(0, BigInt(v), true);
      return b8;
    case GgufValueType.INT64:
      dv.setBigInt64(0, BigInt(v), true);
      return b8;
    case GgufValueType.FLOAT64:
      dv.setFloat64(0, Number(v), true);
      return b8;
    default:
      throw new Error(`cannot write metadata type ${type}`);
  }
}

class Bytes {
  parts: Uint8Array[] = [];
  length = 0;
  push(b: Uint8Array): void {
    this.parts.push(b);
    this.length += b.byteLength;
  }
  u32(v: number): void {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, v, true);
    this.push(b);
  }
  u64(v: number | bigint): void {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(v), true);
    this.push(b);
  }
  str(s: string): void {
    const e = new TextEncoder().encode(s);
    this.u64(e.byteLength);
    this.push(e);
  }
  scalar(type: GgufValueType, v: number | bigint | string | boolean): void {
    if (type === GgufValueType.STRING) this.str(String(v));
    else this.push(encodeScalar(type, v));
  }

  concat(): Uint8Array {
    const out = new Uint8Array(this.length);
    let o = 0;
    for (const p of this.parts) {
      out.set(p, o);
      o += p.byteLength;
    }
    return out;
  }
}

function align(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/** Serialise the header (metadata + tensor table), padded to the data section. */
export function encodeHeader(metadata: Map<string, GgufValue>, tensors: Array<Pick<TensorSpec, "name" | "dims" | "type">>): Uint8Array {
  const b = new Bytes();
  b.u32(GGUF_MAGIC);
  b.u32(3);
  b.u64(tensors.length);
  b.u64(metadata.size);
  for (const [key, v] of metadata) {
    b.str(key);
    b.u32(v.type);
    if (v.type === GgufValueType.ARRAY) {
      b.u32(v.itemType);
      b.u64(v.value.length);
      for (const item of v.value) b.scalar(v.itemType, item);
    } else {
      b.scalar(v.type, v.value);
    }
  }
  let offset = 0;
  for (const t of tensors) {
    b.str(t.name);
    b.u32(t.dims.length);
    for (const d of t.dims) b.u64(d);
    b.u32(t.type);
    b.u64(offset);
    offset = align(offset + tensorBytes(t), GGUF_DEFAULT_ALIGNMENT);
  }
  const pad = align(b.length, GGUF_DEFAULT_ALIGNMENT) - b.length;
  if (pad > 0) b.push(new Uint8Array(pad));
  return b.concat();
}

/** Write a GGUF file; writes to a temporary name and renames, so a crash never leaves a half model. */
export async function writeGguf(path: string, metadata: Map<string, GgufValue>, tensors: TensorSpec[]): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}`;
  const fh = await open(tmp, "w");
  try {
    let pos = 0;
    const write = async (chunk: Uint8Array) => {
      await fh.write(chunk, 0, chunk.byteLength, pos);
      pos += chunk.byteLength;
    };
    await write(encodeHeader(metadata, tensors));
    for (const t of tensors) {
      const expected = tensorBytes(t);
      let written = 0;
      for (const chunk of t.data()) {
        await write(chunk);
        written += chunk.byteLength;
      }
      if (written !== expected) throw new Error(`tensor ${t.name}: wrote ${written} bytes, expected ${expected}`);
      const pad = align(written, GGUF_DEFAULT_ALIGNMENT) - written;
      if (pad > 0) await write(new Uint8Array(pad));
    }
  } finally {
    await fh.close();
  }
  const { rename } = await import("node:fs/promises");
  await rename(tmp, path);
}
