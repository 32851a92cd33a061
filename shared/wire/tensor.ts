// Implements: the tensor bundle binary format — a list of named tensors plus a little
// metadata, laid out as one payload of raw little-endian bytes and a JSON manifest that
// says where each tensor lives. Encoding and decoding are pure; decoding validates
// everything (schema, dtypes, shape products against byte lengths, bounds, alignment,
// unique names) and fails with a `WireDecodeError` carrying a specific `reason`.
// Does not own: the codecs, what the bytes of each dtype mean and how float32 values are
// recovered from them (codecs.ts); splitting into bus-sized frames (frames.ts); moving bytes
// over the bus (transport.ts).
//
// Layout (protocol v1). For each tensor, in manifest order, with n = numel of its LOGICAL
// `shape` (the product; 1 for a scalar, shape []):
//   offset       = align4(cursor); `byteLength` bytes of data, by dtype:
//                    float32, int32: 4n   bf16: 2n (uint16)   int8: n
//                    int4: ceil(n/2) (two per byte)   sign1: ceil(n/8) (one bit each)
//                    topk: 4k (the k kept float32 values)
//   scalesOffset = align4(offset + byteLength) (int8, int4, sign1 only; with `blockSize`):
//                  ceil(n / blockSize) float32 scales, one per block
//   indexOffset  = align4(offset + byteLength) (topk only; with `k`, 1 ≤ k ≤ n, or 0 when
//                  n is 0): k uint32 element indices, strictly increasing, each < n
// int32 tensors (a batch's token ids) are laid out like float32 ones, with no scales.
// Padding bytes are zero; the payload ends right after the last tensor. All multi-byte
// values are little-endian. Because every offset is a multiple of 4, a receiver whose
// payload buffer is itself 4-aligned views the data, scales and indices in place (decode
// copies only when it is not). `meta.codec` names the codec the sender used (codecs.ts
// parseCodec, e.g. "int8", "topk:0.01"; the old "int8-block" still decodes); a receiver
// does not need it to decode, each tensor's dtype says how. The dtypes bf16, int4, sign1,
// topk and the fields k, indexOffset were added within v1 (old bundles decode unchanged).

import { Data, Result, Schema } from "effect"
import { badIndices, parseCodec } from "./codecs.ts"

export const DTYPES = ["float32", "int8", "int32", "bf16", "int4", "sign1", "topk"] as const
export type DType = (typeof DTYPES)[number]
/** A codec name that codecs.ts `parseCodec` accepts: "f32", "bf16", "int8", "topk:0.01", ... */
export type Codec = string

export interface WireTensor {
  readonly name: string
  readonly dtype: DType
  /** Row-major; [] is a scalar. */
  readonly shape: ReadonlyArray<number>
  /**
   * float32: Float32Array; int32: Int32Array; int8: Int8Array; bf16: Uint16Array; int4,
   * sign1: the packed Uint8Array; topk: the k kept values, a Float32Array.
   */
  readonly data: Float32Array | Int8Array | Int32Array | Uint16Array | Uint8Array
  /** int8, int4, sign1: one scale per block of `blockSize` consecutive elements. */
  readonly scales?: Float32Array
  readonly blockSize?: number
  /** topk only: the element index of each value in `data`, strictly increasing, < numel. */
  readonly indices?: Uint32Array
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
  /** The codec name (codecs.ts parseCodec); decoding a bundle rejects an unknown one. */
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
  dtype: Schema.Literals(DTYPES),
  shape: Schema.Array(Nat),
  offset: Nat,
  byteLength: Nat,
  scalesOffset: Schema.optionalKey(Nat),
  blockSize: Schema.optionalKey(Nat.check(Schema.isGreaterThanOrEqualTo(1))),
  /** topk only: values kept, and where their uint32 indices start. */
  k: Schema.optionalKey(Nat),
  indexOffset: Schema.optionalKey(Nat)
})
export type ManifestTensor = typeof ManifestTensor.Type

export const BundleMetaSchema = Schema.Struct({
  kind: Schema.String,
  job: Schema.String,
  version: Schema.Int,
  step: Schema.Int,
  sender: Schema.String,
  batchId: Schema.optionalKey(Schema.String),
  codec: Schema.String, // checked by parseCodec in parseManifest
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
  | "bad-index"
  | "unknown-codec"
  | "missing-manifest"

/** A manifest or payload that does not describe valid tensors. */
export class WireDecodeError extends Data.TaggedError("WireDecodeError")<{
  readonly reason: WireDecodeReason
  readonly message: string
}> {}

export type WireEncodeReason = "duplicate-name" | "bad-name" | "bad-shape" | "dtype-mismatch" | "length-mismatch" | "bad-scales" | "bad-index"

/** A bundle that cannot be encoded (a caller bug: data length vs shape, names, scales). */
export class WireEncodeError extends Data.TaggedError("WireEncodeError")<{
  readonly reason: WireEncodeReason
  readonly message: string
}> {}

/** Bytes of data of a tensor of `numel` elements (topk: of its `k` kept values). */
export const dataBytes = (dtype: DType, numel: number, k = 0): number => {
  switch (dtype) {
    case "float32":
    case "int32":
      return 4 * numel
    case "bf16":
      return 2 * numel
    case "int8":
      return numel
    case "int4":
      return Math.ceil(numel / 2)
    case "sign1":
      return Math.ceil(numel / 8)
    case "topk":
      return 4 * k
  }
}
/** The typed array each dtype's data is. */
const ARRAY: Record<DType, Function> = {
  float32: Float32Array, int32: Int32Array, int8: Int8Array, bf16: Uint16Array, int4: Uint8Array, sign1: Uint8Array, topk: Float32Array
}
const BLOCKED: ReadonlySet<DType> = new Set(["int8", "int4", "sign1"])

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
    const Array_ = ARRAY[t.dtype]
    if (Array_ === undefined || !(t.data instanceof Array_)) {
      return encodeFail("dtype-mismatch", `${at}: dtype ${t.dtype} needs a ${Array_?.name ?? `known dtype (${DTYPES.join(", ")})`}, got a ${t.data?.constructor?.name}`)
    }
    let k = 0
    if (t.dtype === "topk") {
      if (!(t.indices instanceof Uint32Array)) return encodeFail("bad-index", `${at}: topk needs a Uint32Array of indices, got ${(t.indices as { constructor?: { name?: string } } | undefined)?.constructor?.name ?? "none"}`)
      k = t.indices.length
      if (t.data.length !== k) return encodeFail("length-mismatch", `${at}: ${k} indices but ${t.data.length} values`)
      const bad = badIndices(t.indices, numel)
      if (bad) return encodeFail("bad-index", `${at}: ${bad}`)
    }
    const byteLength = dataBytes(t.dtype, numel, k)
    if (t.data.byteLength !== byteLength) {
      return encodeFail("length-mismatch", `${at}: shape [${t.shape}] has ${numel} elements, ${byteLength} bytes as ${t.dtype}; data has ${t.data.byteLength} bytes`)
    }
    const offset = align4(cursor)
    cursor = offset + byteLength
    const entry: ManifestTensor = { name: t.name, dtype: t.dtype, shape: [...t.shape], offset, byteLength }
    if (BLOCKED.has(t.dtype)) {
      const bs = t.blockSize
      if (bs === undefined || !Number.isSafeInteger(bs) || bs < 1 || !(t.scales instanceof Float32Array) || t.scales.length !== blocksOf(numel, bs)) {
        return encodeFail("bad-scales", `${at}: ${t.dtype} needs blockSize ≥ 1 and ceil(numel / blockSize) = ${bs ? blocksOf(numel, bs) : "?"} float32 scales, got ${t.scales?.length}`)
      }
      const scalesOffset = align4(cursor)
      cursor = scalesOffset + t.scales.byteLength
      entries.push({ ...entry, scalesOffset, blockSize: bs })
    } else if (t.dtype === "topk") {
      const indexOffset = align4(cursor)
      cursor = indexOffset + 4 * k
      entries.push({ ...entry, k, indexOffset })
    } else {
      entries.push(entry)
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
    if (e.indexOffset !== undefined && t.indices) put(e.indexOffset, new Uint8Array(t.indices.buffer, t.indices.byteOffset, t.indices.byteLength))
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
  if (Result.isFailure(r)) return decodeFail("bad-manifest", `manifest: ${r.failure.message}`)
  const codec = parseCodec(r.success.meta.codec)
  if (Result.isFailure(codec)) return decodeFail("unknown-codec", `manifest meta.codec: ${codec.failure}`)
  return Result.succeed(r.success)
}

/**
 * Validate `manifest` against `payload` and view the tensors. Data, scales and indices are
 * views into `payload` (no copy) when its address suits them (`payload.byteOffset` a
 * multiple of 4), copies otherwise; int8, int4 and sign1 data are always views. Keep
 * `payload` alive and unmodified while the bundle is in use.
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
    const blocked = BLOCKED.has(e.dtype)
    if (!blocked && (e.scalesOffset !== undefined || e.blockSize !== undefined)) return decodeFail("bad-scales", `${at}: ${e.dtype} tensors carry no scales or blockSize`)
    if (blocked && (e.scalesOffset === undefined || e.blockSize === undefined)) return decodeFail("bad-scales", `${at}: ${e.dtype} tensors need scalesOffset and blockSize`)
    const topk = e.dtype === "topk"
    if (!topk && (e.k !== undefined || e.indexOffset !== undefined)) return decodeFail("bad-index", `${at}: ${e.dtype} tensors carry no k or indexOffset`)
    if (topk && (e.k === undefined || e.indexOffset === undefined)) return decodeFail("bad-index", `${at}: topk tensors need k and indexOffset`)
    const k = e.k ?? 0
    if (topk && (k > numel || (k === 0 && numel > 0))) return decodeFail("bad-index", `${at}: k = ${k} kept values must be in [1, ${numel}] (numel of shape [${e.shape}])`)
    const want = dataBytes(e.dtype, numel, k)
    if (e.byteLength !== want) {
      return decodeFail("byte-length-mismatch", `${at}: shape [${e.shape}] of ${e.dtype}${topk ? ` with k = ${k}` : ""} needs ${want} bytes, manifest says ${e.byteLength}`)
    }
    const bad = region(at, "data", e.offset, e.byteLength)
    if (bad) return bad
    const data = dataView(e.dtype, payload, e.offset, e.byteLength)
    if (blocked) {
      const nScales = blocksOf(numel, e.blockSize!)
      const badScales = region(at, "scales", e.scalesOffset!, nScales * 4)
      if (badScales) return badScales
      tensors.push({ name: e.name, dtype: e.dtype, shape: e.shape, data, scales: viewAs(Float32Array, payload, e.scalesOffset!, nScales), blockSize: e.blockSize })
    } else if (topk) {
      const badIdx = region(at, "indices", e.indexOffset!, 4 * k)
      if (badIdx) return badIdx
      const indices = viewAs(Uint32Array, payload, e.indexOffset!, k)
      const why = badIndices(indices, numel)
      if (why) return decodeFail("bad-index", `${at}: ${why}`)
      tensors.push({ name: e.name, dtype: e.dtype, shape: e.shape, data, indices })
    } else {
      tensors.push({ name: e.name, dtype: e.dtype, shape: e.shape, data })
    }
  }
  return Result.succeed({ tensors, meta: m.meta })
}

type TypedArrayOf<T> = { new (buffer: ArrayBufferLike, byteOffset: number, length: number): T; readonly BYTES_PER_ELEMENT: number }

/** `length` elements of payload[offset..]: a view when the address is aligned for them, else a copy. */
const viewAs = <T>(C: TypedArrayOf<T>, payload: Uint8Array, offset: number, length: number): T => {
  const at = payload.byteOffset + offset
  if (at % C.BYTES_PER_ELEMENT === 0) return new C(payload.buffer, at, length)
  // Uint8Array's slice copies (a Node Buffer's slice would be a view of its whole pool)
  return new C(Uint8Array.prototype.slice.call(payload, offset, offset + length * C.BYTES_PER_ELEMENT).buffer, 0, length)
}

const dataView = (dtype: DType, payload: Uint8Array, offset: number, byteLength: number): WireTensor["data"] => {
  switch (dtype) {
    case "float32":
    case "topk":
      return viewAs(Float32Array, payload, offset, byteLength / 4)
    case "int32":
      return viewAs(Int32Array, payload, offset, byteLength / 4)
    case "bf16":
      return viewAs(Uint16Array, payload, offset, byteLength / 2)
    case "int8":
      return new Int8Array(payload.buffer, payload.byteOffset + offset, byteLength)
    case "int4":
    case "sign1":
      return new Uint8Array(payload.buffer, payload.byteOffset + offset, byteLength)
  }
}
