// Implements: the tensor bundle binary format — a list of named tensors plus a little
// metadata, laid out as one payload of raw little-endian bytes and a JSON manifest that
// says where each tensor lives. Encoding and decoding are pure; decoding validates
// everything (schema, dtypes, shape products against byte lengths, bounds, alignment,
// unique names) and fails with a `WireDecodeError` carrying a specific `reason`.
// Does not own: quantization (codec.ts), splitting into bus-sized frames (frames.ts),
// moving bytes over the bus (transport.ts).
//
// Layout (protocol v1). For each tensor, in manifest order:
//   offset       = align4(cursor); `byteLength` = numel × bytes(dtype) bytes of data
//   scalesOffset = align4(offset + byteLength) (int8 only); ceil(numel / blockSize)
//                  float32 absmax scales (dequantized value = q × scale of its block)
// int32 tensors (a batch's token ids) are laid out like float32 ones, with no scales.
// numel is the product of `shape` (1 for a scalar, shape []). Padding bytes are zero; the
// payload ends right after the last tensor. All multi-byte values are little-endian
// IEEE-754. Because every offset is a multiple of 4, a receiver whose payload buffer is
// itself 4-aligned views float32 data in place (decode copies only when it is not).

import { Data, Result, Schema } from "effect"

export type DType = "float32" | "int8" | "int32"
export type Codec = "f32" | "int8-block"

export interface WireTensor {
  readonly name: string
  readonly dtype: DType
  /** Row-major; [] is a scalar. */
  readonly shape: ReadonlyArray<number>
  readonly data: Float32Array | Int8Array | Int32Array
  /** int8 only: one absmax scale per block of `blockSize` consecutive elements. */
  readonly scales?: Float32Array
  readonly blockSize?: number
}

export interface BundleMeta {
  /** "grads", "params", "activations", ... */
  readonly kind: string
  readonly job: string
  /** Params version the tensors belong to (grads: computed on; params: this version). */
  readonly version: number
  readonly step: number
  readonly sender: string
  readonly batchId?: string
  readonly codec: Codec
  readonly extra?: Readonly<Record<string, string | number>>
}

export interface TensorBundle {
  readonly tensors: ReadonlyArray<WireTensor>
  readonly meta: BundleMeta
}

export const WIRE_FORMAT_VERSION = 1

const Nat = Schema.Int.check(Schema.isGreaterThanOrEqualTo(0))

export const ManifestTensor = Schema.Struct({
  name: Schema.NonEmptyString,
  dtype: Schema.Literals(["float32", "int8", "int32"]),
  shape: Schema.Array(Nat),
  offset: Nat,
  byteLength: Nat,
  scalesOffset: Schema.optionalKey(Nat),
  blockSize: Schema.optionalKey(Nat.check(Schema.isGreaterThanOrEqualTo(1)))
})
export type ManifestTensor = typeof ManifestTensor.Type

export const BundleMetaSchema = Schema.Struct({
  kind: Schema.String,
  job: Schema.String,
  version: Schema.Int,
  step: Schema.Int,
  sender: Schema.String,
  batchId: Schema.optionalKey(Schema.String),
  codec: Schema.Literals(["f32", "int8-block"]),
  extra: Schema.optionalKey(Schema.Record(Schema.String, Schema.Union([Schema.String, Schema.Finite])))
})

/** The JSON that travels with a payload (in the `Flotilla-Manifest` header). */
export const Manifest = Schema.Struct({
  v: Schema.Literal(WIRE_FORMAT_VERSION),
  /** Payload length in bytes. */
  byteLength: Nat,
  meta: BundleMetaSchema,
  tensors: Schema.Array(ManifestTensor)
})
export type Manifest = typeof Manifest.Type

export interface EncodedBundle {
  readonly manifest: Manifest
  readonly payload: Uint8Array
}

export type WireDecodeReason =
  | "bad-json"
  | "bad-manifest"
  | "length-mismatch"
  | "duplicate-name"
  | "bad-shape"
  | "byte-length-mismatch"
  | "out-of-bounds"
  | "misaligned"
  | "overlap"
  | "bad-scales"
  | "missing-manifest"

/** A manifest or payload that does not describe valid tensors. */
export class WireDecodeError extends Data.TaggedError("WireDecodeError")<{
  readonly reason: WireDecodeReason
  readonly message: string
}> {}

export type WireEncodeReason = "duplicate-name" | "bad-name" | "bad-shape" | "dtype-mismatch" | "length-mismatch" | "bad-scales"

/** A bundle that cannot be encoded (a caller bug: data length vs shape, names, scales). */
export class WireEncodeError extends Data.TaggedError("WireEncodeError")<{
  readonly reason: WireEncodeReason
  readonly message: string
}> {}

const BYTES: Record<DType, number> = { float32: 4, int8: 1, int32: 4 }
/** The next multiple of 4 (arithmetic, not a bitwise AND: payloads may pass 2 GiB). */
const align4 = (n: number): number => Math.ceil(n / 4) * 4
const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1

/** Elements in a shape, or -1 when it is not a list of non-negative safe integers. */
export const numelOf = (shape: ReadonlyArray<number>): number => {
  let n = 1
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) return -1
    n *= d
  }
  return Number.isSafeInteger(n) ? n : -1
}

const blocksOf = (numel: number, blockSize: number): number => Math.ceil(numel / blockSize)

/** `n` uninitialised bytes at offset 0 of their own ArrayBuffer (so 4-aligned), no zeroing. */
export const allocBytes = (n: number): Uint8Array => new Uint8Array(Buffer.allocUnsafeSlow(n).buffer, 0, n)

const encodeFail = (reason: WireEncodeReason, message: string) =>
  Result.fail(new WireEncodeError({ reason, message }))

/**
 * Lay the tensors out as one payload (one copy of their bytes) and describe it. `alloc`
 * gives the payload's memory: `n` bytes at a 4-aligned address, contents irrelevant.
 */
export const encodeBundle = (
  bundle: TensorBundle,
  alloc: (n: number) => Uint8Array = allocBytes
): Result.Result<EncodedBundle, WireEncodeError> => {
  if (!LITTLE_ENDIAN) throw new Error("flotilla wire: big-endian hosts are not supported")
  const entries: Array<ManifestTensor> = []
  const names = new Set<string>()
  let cursor = 0
  for (const t of bundle.tensors) {
    const at = `tensor ${JSON.stringify(t.name)}`
    if (typeof t.name !== "string" || t.name.length === 0) return encodeFail("bad-name", "tensor names must be non-empty strings")
    if (names.has(t.name)) return encodeFail("duplicate-name", `${at} appears twice`)
    names.add(t.name)
    const numel = numelOf(t.shape)
    if (numel < 0) return encodeFail("bad-shape", `${at}: shape [${t.shape}] is not a list of non-negative integers`)
    const ok = t.dtype === "float32" ? t.data instanceof Float32Array : t.dtype === "int32" ? t.data instanceof Int32Array : t.dtype === "int8" && t.data instanceof Int8Array
    if (!ok) return encodeFail("dtype-mismatch", `${at}: dtype ${t.dtype} with a ${t.data?.constructor?.name} (float32 needs Float32Array, int32 Int32Array, int8 Int8Array)`)
    if (t.data.length !== numel) return encodeFail("length-mismatch", `${at}: shape [${t.shape}] has ${numel} elements, data has ${t.data.length}`)
    const offset = align4(cursor)
    const byteLength = numel * BYTES[t.dtype]
    cursor = offset + byteLength
    if (t.dtype === "int8") {
      const bs = t.blockSize
      if (bs === undefined || !Number.isSafeInteger(bs) || bs < 1 || !(t.scales instanceof Float32Array) || t.scales.length !== blocksOf(numel, bs)) {
        return encodeFail("bad-scales", `${at}: int8 needs blockSize ≥ 1 and ceil(numel / blockSize) = ${bs ? blocksOf(numel, bs) : "?"} float32 scales, got ${t.scales?.length}`)
      }
      const scalesOffset = align4(cursor)
      cursor = scalesOffset + t.scales.byteLength
      entries.push({ name: t.name, dtype: t.dtype, shape: [...t.shape], offset, byteLength, scalesOffset, blockSize: bs })
    } else {
      entries.push({ name: t.name, dtype: t.dtype, shape: [...t.shape], offset, byteLength })
    }
  }
  const payload = alloc(cursor) // every byte is written below, padding included
  let end = 0
  const put = (at: number, bytes: Uint8Array) => {
    payload.fill(0, end, at) // alignment padding
    payload.set(bytes, at)
    end = at + bytes.length
  }
  bundle.tensors.forEach((t, i) => {
    const e = entries[i]
    put(e.offset, new Uint8Array(t.data.buffer, t.data.byteOffset, e.byteLength))
    if (e.scalesOffset !== undefined && t.scales) put(e.scalesOffset, new Uint8Array(t.scales.buffer, t.scales.byteOffset, t.scales.byteLength))
  })
  const manifest: Manifest = { v: WIRE_FORMAT_VERSION, byteLength: cursor, meta: bundle.meta, tensors: entries }
  return Result.succeed({ manifest, payload })
}

// ---------------------------------------------------------------------------------------
// Manifest JSON: ASCII only (header-safe: no CR/LF, no bytes ≥ 0x80).

const NON_ASCII = /[\u007f-\uffff]/g
const escapeNonAscii = (c: string) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0")

export const manifestToJson = (m: Manifest): string => JSON.stringify(m).replace(NON_ASCII, escapeNonAscii)

const decodeManifestSchema = Schema.decodeUnknownResult(Manifest)

const decodeFail = (reason: WireDecodeReason, message: string) =>
  Result.fail(new WireDecodeError({ reason, message }))

/** Parse and schema-check a manifest given as JSON text or as an already parsed value. */
export const parseManifest = (input: unknown): Result.Result<Manifest, WireDecodeError> => {
  let value = input
  if (typeof input === "string") {
    try {
      value = JSON.parse(input)
    } catch (e) {
      return decodeFail("bad-json", `manifest is not JSON: ${(e as Error).message}`)
    }
  }
  const r = decodeManifestSchema(value)
  return Result.isSuccess(r) ? Result.succeed(r.success) : decodeFail("bad-manifest", `manifest: ${r.failure.message}`)
}

/**
 * Validate `manifest` against `payload` and view the tensors. Float32 data and scales are
 * views into `payload` (no copy) when `payload.byteOffset` is a multiple of 4, copies
 * otherwise; int8 data is always a view. Keep `payload` alive and unmodified while the
 * bundle is in use.
 */
export const decodeBundle = (manifest: unknown, payload: Uint8Array): Result.Result<TensorBundle, WireDecodeError> => {
  if (!LITTLE_ENDIAN) throw new Error("flotilla wire: big-endian hosts are not supported")
  const parsed = parseManifest(manifest)
  if (Result.isFailure(parsed)) return Result.fail(parsed.failure)
  const m = parsed.success
  if (m.byteLength !== payload.length) {
    return decodeFail("length-mismatch", `manifest says ${m.byteLength} payload bytes, got ${payload.length}`)
  }
  const names = new Set<string>()
  const tensors: Array<WireTensor> = []
  let cursor = 0 // regions must come in order and not overlap
  const region = (at: string, what: string, offset: number, length: number) => {
    if (offset % 4 !== 0) return decodeFail("misaligned", `${at}: ${what} offset ${offset} is not a multiple of 4`)
    if (offset < cursor) return decodeFail("overlap", `${at}: ${what} at ${offset} overlaps the previous region (ends at ${cursor})`)
    if (offset + length > payload.length) {
      return decodeFail("out-of-bounds", `${at}: ${what} [${offset}, ${offset + length}) is past the payload end ${payload.length}`)
    }
    cursor = offset + length
    return undefined
  }
  for (const e of m.tensors) {
    const at = `tensor ${JSON.stringify(e.name)}`
    if (names.has(e.name)) return decodeFail("duplicate-name", `${at} appears twice in the manifest`)
    names.add(e.name)
    const numel = numelOf(e.shape)
    if (numel < 0) return decodeFail("bad-shape", `${at}: shape [${e.shape}] has too many elements`)
    if (e.byteLength !== numel * BYTES[e.dtype]) {
      return decodeFail("byte-length-mismatch", `${at}: shape [${e.shape}] of ${e.dtype} needs ${numel * BYTES[e.dtype]} bytes, manifest says ${e.byteLength}`)
    }
    const bad = region(at, "data", e.offset, e.byteLength)
    if (bad) return bad
    if (e.dtype === "float32" || e.dtype === "int32") {
      if (e.scalesOffset !== undefined || e.blockSize !== undefined) return decodeFail("bad-scales", `${at}: ${e.dtype} tensors carry no scales or blockSize`)
      const f = viewF32(payload, e.offset, numel)
      tensors.push({ name: e.name, dtype: e.dtype, shape: e.shape, data: e.dtype === "float32" ? f : new Int32Array(f.buffer, f.byteOffset, numel) })
      continue
    }
    if (e.scalesOffset === undefined || e.blockSize === undefined) return decodeFail("bad-scales", `${at}: int8 tensors need scalesOffset and blockSize`)
    const nScales = blocksOf(numel, e.blockSize)
    const badScales = region(at, "scales", e.scalesOffset, nScales * 4)
    if (badScales) return badScales
    tensors.push({
      name: e.name,
      dtype: "int8",
      shape: e.shape,
      data: new Int8Array(payload.buffer, payload.byteOffset + e.offset, numel),
      scales: viewF32(payload, e.scalesOffset, nScales),
      blockSize: e.blockSize
    })
  }
  return Result.succeed({ tensors, meta: m.meta })
}

const viewF32 = (payload: Uint8Array, offset: number, length: number): Float32Array => {
  const at = payload.byteOffset + offset
  if (at % 4 === 0) return new Float32Array(payload.buffer, at, length)
  // Uint8Array's slice copies (a Node Buffer's slice would be a view of its whole pool)
  return new Float32Array(Uint8Array.prototype.slice.call(payload, offset, offset + length * 4).buffer)
}
