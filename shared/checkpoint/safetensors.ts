// Implements: the safetensors file format (Hugging Face's `safetensors`), so Flotilla can
// write weights other tools load and read weights other tools wrote.
// Owns: the byte layout, encoding float32 tensors, decoding float tensors (F32, F16, BF16,
// F64 → float32) with every structural check the reference implementation makes, and
// `SafetensorsError`. Does not own: what the tensors are called or mean (shared/models/
// hf-gpt2.ts maps GPT-2 names), reading or writing files, or when to export.
//
// Layout:
//   bytes [0, 8)        N, the header length: u64 little-endian
//   bytes [8, 8+N)      the header: UTF-8 JSON, one object
//                         { "<name>": { "dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end] },
//                           ...,
//                           "__metadata__": { "<key>": "<string value>" } }   (optional)
//                       padded with spaces so that 8+N is a multiple of 8 (the reference
//                       writer does this; readers must not rely on it)
//   bytes [8+N, end)    the buffer: each tensor's row-major little-endian data at
//                       [8+N+begin, 8+N+end); end − begin = numel(shape) × bytes(dtype).
// Like the reference (safetensors' Rust `validate`), a reader rejects tensors that overlap,
// gaps between them, and bytes after the last one: together the tensors tile the buffer.
// Decoding copies: the result never aliases the input bytes.

export class SafetensorsError extends Error {
  readonly _tag = "SafetensorsError"
  override readonly name = "SafetensorsError"
}

export interface SafetensorsInput {
  readonly name: string
  /** Row-major; [] is a scalar. */
  readonly shape: readonly number[]
  readonly data: Float32Array
}

export interface SafetensorsTensor {
  /** The dtype in the file ("F32", "F16", "BF16", "F64"); `data` is float32 whatever it was. */
  readonly dtype: string
  readonly shape: number[]
  readonly data: Float32Array
}

export interface DecodedSafetensors {
  /** In the order of their data in the file. */
  readonly tensors: Map<string, SafetensorsTensor>
  readonly metadata: Record<string, string>
}

export interface DecodeOptions {
  /** Tensors to validate but not convert or return (e.g. GPT-2's `attn.bias` buffers,
   *  which some writers store as BOOL or U8): their dtype need not be a float. */
  readonly skip?: (name: string) => boolean
}

/** Bytes per element of every dtype the format defines (sub-byte F4/F6 are not read). */
const DTYPE_BYTES: Readonly<Record<string, number>> = {
  BOOL: 1, U8: 1, I8: 1, F8_E5M2: 1, F8_E4M3: 1, F8_E8M0: 1,
  I16: 2, U16: 2, F16: 2, BF16: 2,
  I32: 4, U32: 4, F32: 4,
  I64: 8, U64: 8, F64: 8, C64: 8
}
const READABLE = ["F32", "F16", "BF16", "F64"]
const METADATA_KEY = "__metadata__"

const littleEndianHost = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1

const numel = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1)

const isCount = (x: unknown): x is number => typeof x === "number" && Number.isSafeInteger(x) && x >= 0

/** float32 tensors → safetensors bytes, in the given order, header padded to 8. */
export const encodeSafetensors = (
  tensors: ReadonlyArray<SafetensorsInput>,
  metadata?: Record<string, string>
): Uint8Array => {
  const seen = new Set<string>()
  const entries: string[] = []
  if (metadata !== undefined && Object.keys(metadata).length > 0) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== "string") throw new SafetensorsError(`safetensors: metadata "${k}" is a ${typeof v}; values must be strings`)
    }
    entries.push(`${JSON.stringify(METADATA_KEY)}:${JSON.stringify(metadata)}`)
  }
  let offset = 0
  for (const t of tensors) {
    if (t.name === METADATA_KEY) throw new SafetensorsError(`safetensors: a tensor cannot be named ${METADATA_KEY}`)
    if (seen.has(t.name)) throw new SafetensorsError(`safetensors: duplicate tensor name "${t.name}"`)
    seen.add(t.name)
    if (!t.shape.every(isCount)) throw new SafetensorsError(`safetensors: tensor "${t.name}" has shape [${t.shape}]; dims must be non-negative integers`)
    if (numel(t.shape) !== t.data.length) {
      throw new SafetensorsError(`safetensors: tensor "${t.name}" has shape [${t.shape}] (${numel(t.shape)} elements) but ${t.data.length} values`)
    }
    const end = offset + 4 * t.data.length
    // built by hand, not JSON.stringify of an object: JS objects put integer-like keys
    // ("0", "1") first, and the header should list tensors in the order given
    entries.push(`${JSON.stringify(t.name)}:${JSON.stringify({ dtype: "F32", shape: [...t.shape], data_offsets: [offset, end] })}`)
    offset = end
  }
  const json = new TextEncoder().encode(`{${entries.join(",")}}`)
  const N = json.length + ((8 - (json.length % 8)) % 8)
  const out = new Uint8Array(8 + N + offset)
  new DataView(out.buffer).setBigUint64(0, BigInt(N), true)
  out.set(json, 8)
  out.fill(0x20, 8 + json.length, 8 + N) // spaces
  let at = 8 + N
  for (const t of tensors) {
    if (littleEndianHost) out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), at)
    else {
      const dv = new DataView(out.buffer, at, t.data.byteLength)
      for (let i = 0; i < t.data.length; i++) dv.setFloat32(4 * i, t.data[i], true)
    }
    at += t.data.byteLength
  }
  return out
}

/** The top-level keys of a JSON object text, duplicates included (JSON.parse keeps only the
 *  last of duplicates, so it cannot see them). `text` must already be valid JSON. */
const topLevelKeys = (text: string): string[] => {
  const keys: string[] = []
  let depth = 0
  let expectKey = false
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]
    if (ch === '"') {
      let j = i + 1
      while (text[j] !== '"') j += text[j] === "\\" ? 2 : 1
      if (depth === 1 && expectKey) {
        keys.push(JSON.parse(text.slice(i, j + 1)) as string)
        expectKey = false
      }
      i = j
    } else if (ch === "{" || ch === "[") {
      depth++
      if (depth === 1) expectKey = true
    } else if (ch === "}" || ch === "]") depth--
    else if (ch === "," && depth === 1) expectKey = true
  }
  return keys
}

let halfTable: Float32Array | undefined
/** IEEE half bits → float32, all 65536 of them (built once, 256 KB). */
const halves = (): Float32Array => {
  if (halfTable !== undefined) return halfTable
  const t = new Float32Array(65536)
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1
    const e = (h >> 10) & 0x1f
    const f = h & 0x3ff
    t[h] = e === 0 ? sign * f * 2 ** -24 : e === 31 ? (f === 0 ? sign * Infinity : NaN) : sign * (1 + f / 1024) * 2 ** (e - 15)
  }
  halfTable = t
  return t
}

/** Raw little-endian bytes of one tensor → a fresh float32 array. */
const toFloat32 = (raw: Uint8Array, dtype: string, n: number): Float32Array => {
  const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength)
  const out = new Float32Array(n)
  if (dtype === "F32") {
    if (littleEndianHost) out.set(new Float32Array(Uint8Array.prototype.slice.call(raw).buffer, 0, n)) // an aligned copy (a Buffer's own slice is a view)
    else for (let i = 0; i < n; i++) out[i] = dv.getFloat32(4 * i, true)
  } else if (dtype === "F16") {
    const table = halves()
    for (let i = 0; i < n; i++) out[i] = table[dv.getUint16(2 * i, true)]
  } else if (dtype === "BF16") {
    // bfloat16 is the top half of a float32; both views use the host's byte order
    const bits = new Uint32Array(out.buffer)
    for (let i = 0; i < n; i++) bits[i] = dv.getUint16(2 * i, true) << 16
  } else {
    for (let i = 0; i < n; i++) out[i] = dv.getFloat64(8 * i, true) // F64: rounded to float32
  }
  return out
}

interface Entry {
  readonly name: string
  readonly dtype: string
  readonly shape: number[]
  readonly begin: number
  readonly end: number
}

/** safetensors bytes → float32 tensors and metadata. `what` names the input in errors
 *  (a path, "checkpoint upload", ...). */
export const decodeSafetensors = (
  bytes: Uint8Array,
  what = "safetensors",
  options: DecodeOptions = {}
): DecodedSafetensors => {
  const fail = (message: string): never => {
    throw new SafetensorsError(`${what}: ${message}`)
  }
  if (bytes.length < 8) fail(`too short: ${bytes.length} bytes, but the file starts with an 8-byte header length`)
  const headerLength = new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true)
  if (headerLength > BigInt(bytes.length - 8)) {
    fail(`header length ${headerLength} runs past the end of the ${bytes.length}-byte input`)
  }
  const N = Number(headerLength)
  let text: string
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + N))
  } catch {
    return fail("header is not valid UTF-8")
  }
  let header: unknown
  try {
    header = JSON.parse(text)
  } catch (e) {
    return fail(`header is not JSON (${e instanceof Error ? e.message : String(e)})`)
  }
  if (typeof header !== "object" || header === null || Array.isArray(header)) fail("header is not a JSON object")
  const keys = topLevelKeys(text)
  const dup = keys.find((k, i) => keys.indexOf(k) !== i)
  if (dup !== undefined) fail(`duplicate name "${dup}" in the header`)

  const bufferLength = bytes.length - 8 - N
  const metadata: Record<string, string> = {}
  const entries: Entry[] = []
  for (const [name, info] of Object.entries(header as Record<string, unknown>)) {
    if (name === METADATA_KEY) {
      if (typeof info !== "object" || info === null || Array.isArray(info)) fail(`${METADATA_KEY} is not an object`)
      for (const [k, v] of Object.entries(info as Record<string, unknown>)) {
        if (typeof v !== "string") fail(`${METADATA_KEY}.${k} is not a string (metadata maps strings to strings)`)
        metadata[k] = v as string
      }
      continue
    }
    const t = (typeof info === "object" && info !== null ? info : {}) as Record<string, unknown>
    const { dtype, shape, data_offsets: offsets } = t
    if (typeof dtype !== "string") fail(`tensor "${name}" has no dtype (a string such as "F32")`)
    if (!Array.isArray(shape) || !shape.every(isCount)) fail(`tensor "${name}" has no shape (an array of non-negative integers)`)
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isCount)) {
      fail(`tensor "${name}" has no data_offsets (two non-negative integers [begin, end])`)
    }
    const [begin, end] = offsets as number[]
    const size = DTYPE_BYTES[dtype as string]
    if (size === undefined) fail(`tensor "${name}" has unknown dtype "${dtype}"`)
    if (begin > end || end > bufferLength) {
      fail(`tensor "${name}" data_offsets [${begin}, ${end}] are out of range (the buffer holds ${bufferLength} bytes)`)
    }
    const expected = numel(shape as number[]) * size
    if (end - begin !== expected) {
      fail(`tensor "${name}" data_offsets [${begin}, ${end}] hold ${end - begin} bytes, but shape [${shape}] of ${dtype} needs ${expected}`)
    }
    entries.push({ name, dtype: dtype as string, shape: [...(shape as number[])], begin, end })
  }
  entries.sort((a, b) => a.begin - b.begin || a.end - b.end)
  let cursor = 0
  let previous = "the start of the buffer"
  for (const e of entries) {
    if (e.begin < cursor) fail(`tensors ${previous} and "${e.name}" overlap (data_offsets begin ${e.begin} < ${cursor})`)
    if (e.begin > cursor) fail(`gap of ${e.begin - cursor} bytes before tensor "${e.name}" (after ${previous})`)
    cursor = e.end
    previous = `"${e.name}"`
  }
  if (cursor !== bufferLength) fail(`${bufferLength - cursor} bytes after the last tensor's data`)

  const tensors = new Map<string, SafetensorsTensor>()
  const base = 8 + N
  for (const e of entries) {
    if (options.skip?.(e.name) === true) continue
    if (!READABLE.includes(e.dtype)) fail(`tensor "${e.name}" has dtype ${e.dtype}; only ${READABLE.join(", ")} are read`)
    tensors.set(e.name, { dtype: e.dtype, shape: e.shape, data: toFloat32(bytes.subarray(base + e.begin, base + e.end), e.dtype, numel(e.shape)) })
  }
  return { tensors, metadata }
}
