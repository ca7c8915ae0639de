import { GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, type GgufHeader, type GgufTensorInfo, type GgufValue, GgufValueType } from "./types";

/** Why a file could not be read as GGUF. */
export class GgufError extends Error {
  readonly code = "gguf_invalid";
}

const MAX_STRING = 64 * 1024 * 1024;
const MAX_ARRAY = 16 * 1024 * 1024;
const MAX_COUNT = 1_000_000;

class Cursor {
  private view: DataView;
  pos = 0;
  constructor(private buf: Uint8Array) {
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }
  need(n: number): void {
    if (this.pos + n > this.buf.byteLength) throw new NeedMore();
  }
  u8(): number {
    this.need(1);
    return this.view.getUint8(this.pos++);
  }
  u32(): number {
    this.need(4);
    const v = this.view.getUint32(this.pos, true);
    this.pos += 4;
    return v;
  }
  u64(): bigint {
    this.need(8);
    const v = this.view.getBigUint64(this.pos, true);
    this.pos += 8;
    return v;
  }
  count(limit: number, what: string): number {
    const v = this.u64();
    if (v > BigInt(limit)) throw new GgufError(`${what} too large (${v})`);
    return Number(v);
  }
  str(): string {
    const n = this.count(MAX_STRING, "string length");
    this.need(n);
    const s = new TextDecoder("utf-8", { fatal: false }).decode(this.buf.subarray(this.pos, this.pos + n));
    this.pos += n;
    return s;
  }
  scalar(type: GgufValueType): number | bigint | string | boolean {
    const v = this.view;
    switch (type) {
      case GgufValueType.UINT8:
        return this.u8();
      case GgufValueType.INT8:
        this.need(1);
        return v.getInt8(this.pos++);
      case GgufValueType.UINT16:
        this.need(2);
        this.pos += 2;
        return v.getUint16(this.pos - 2, true);
      case GgufValueType.INT16:
        this.need(2);
        this.pos += 2;
        return v.getInt16(this.pos - 2, true);
      case GgufValueType.UINT32:
        return this.u32();
      case GgufValueType.INT32:
        this.need(4);
        this.pos += 4;
        return v.getInt32(this.pos - 4, true);
      case GgufValueType.FLOAT32:
        this.need(4);
        this.pos += 4;
        return v.getFloat32(this.pos - 4, true);
      case GgufValueType.BOOL:
        return this.u8() !== 0;
      case GgufValueType.STRING:
        return this.str();
      case GgufValueType.UINT64:
        return this.u64();
      case GgufValueType.INT64:
        this.need(8);
        this.pos += 8;
        return v.getBigInt64(this.pos - 8, true);
      case GgufValueType.FLOAT64:
        this.need(8);
        this.pos += 8;
        return v.getFloat64(this.pos - 8, true);
      default:
        throw new GgufError(`unknown metadata value type ${type}`);
    }
  }
}

class NeedMore extends Error {}

function parse(buf: Uint8Array): GgufHeader {
  const c = new Cursor(buf);
  if (c.u32() !== GGUF_MAGIC) throw new GgufError("not a GGUF file (bad magic)");
  const version = c.u32();
  if (version < 2 || version > 3) throw new GgufError(`unsupported GGUF version ${version}`);
  const nTensors = c.count(MAX_COUNT, "tensor count");
  const nKv = c.count(MAX_COUNT, "metadata count");
  const metadata = new Map<string, GgufValue>();
  for (let i = 0; i < nKv; i++) {
    const key = c.str();
    const type = c.u32() as GgufValueType;
    if (type === GgufValueType.ARRAY) {
      const itemType = c.u32() as GgufValueType;
      const n = c.count(MAX_ARRAY, "array length");
      const value: Array<number | bigint | string | boolean> = new Array(n);
      for (let k = 0; k < n; k++) value[k] = c.scalar(itemType);
      metadata.set(key, { type, itemType, value });
    } else {
      metadata.set(key, { type, value: c.scalar(type) } as GgufValue);
    }
  }
  const tensors: GgufTensorInfo[] = [];
  for (let i = 0; i < nTensors; i++) {
    const name = c.str();
    const nDims = c.u32();
    if (nDims > 8) throw new GgufError(`tensor ${name} has ${nDims} dimensions`);
    const dims: number[] = [];
    for (let d = 0; d < nDims; d++) dims.push(Number(c.u64()));
    const type = c.u32();
    const offset = c.u64();
    tensors.push({ name, dims, type, offset });
  }
  const alignEntry = metadata.get("general.alignment");
  const alignment = alignEntry && typeof alignEntry.value === "number" ? alignEntry.value : GGUF_DEFAULT_ALIGNMENT;
  const dataOffset = Math.ceil(c.pos / alignment) * alignment;
  return { version, metadata, tensors, alignment, dataOffset };
}

/** Parse a GGUF header from bytes that hold at least the whole header. */
export function parseGguf(bytes: Uint8Array): GgufHeader {
  try {
    return parse(bytes);
  } catch (e) {
    if (e instanceof NeedMore) throw new GgufError("truncated GGUF header");
    throw e;
  }
}

/** Read a GGUF file's header, reading only as much of the file as the header needs. */
export async function readGgufHeader(path: string): Promise<GgufHeader> {
  const file = Bun.file(path);
  const size = file.size;
  let chunk = Math.min(size, 4 * 1024 * 1024);
  for (;;) {
    const bytes = new Uint8Array(await file.slice(0, chunk).arrayBuffer());
    try {
      return parse(bytes);
    } catch (e) {
      if (!(e instanceof NeedMore)) throw e;
      if (chunk >= size) throw new GgufError("truncated GGUF header");
      chunk = Math.min(size, chunk * 4);
    }
  }
}
