/** GGUF metadata value types, as numbered by the format. */
export enum GgufValueType {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
}

/** The ggml tensor types this project writes (F32 norms, F16 weights). */
export enum GgmlType {
  F32 = 0,
  F16 = 1,
}

/** A typed metadata value: the type is kept so a value can be written back unchanged. */
export type GgufValue =
  | { type: Exclude<GgufValueType, GgufValueType.ARRAY | GgufValueType.STRING | GgufValueType.BOOL>; value: number | bigint }
  | { type: GgufValueType.STRING; value: string }
  | { type: GgufValueType.BOOL; value: boolean }
  | { type: GgufValueType.ARRAY; itemType: GgufValueType; value: Array<number | bigint | string | boolean> };

/** Where a tensor sits in the file and what shape it has. */
export interface GgufTensorInfo {
  name: string;
  /** Dimensions innermost first, as ggml stores them. */
  dims: number[];
  type: number;
  /** Offset from the start of the data section. */
  offset: bigint;
}

/** A parsed GGUF header. */
export interface GgufHeader {
  version: number;
  metadata: Map<string, GgufValue>;
  tensors: GgufTensorInfo[];
  alignment: number;
  /** Absolute file offset of the tensor data section. */
  dataOffset: number;
}

export const GGUF_MAGIC = 0x46554747; // "GGUF" little-endian
export const GGUF_DEFAULT_ALIGNMENT = 32;
