// Implements: the codec registry for float32 tensors on the wire — f32, bf16, int8, int4,
// sign1 and topk:F — by name (`parseCodec`, `codecName`), encoding with error feedback
// (`encodeTensor`), the float32 values of any wire tensor (`decodeTensor`) and the bytes a
// codec takes (`encodedBytes`). Pure: no I/O, no clocks.
// Does not own: the payload layout and its validation (tensor.ts); which tensors travel
// under which codec and the long-lived residuals (the sender: compression.ts).
//
// Codecs, for n elements cut into blocks of `blockSize` consecutive ones (the last block
// may be shorter); y is the decoded value of v (v = x, or x + residual, see below):
//   f32     the float32 data as is (shared, no copy).                             4n bytes
//   bf16    the top 16 bits of v's float32, rounded to nearest even (NaN stays NaN).   2n
//           |v − y| ≤ 2^-8·|v| in the normal range (8 significant bits).
//   int8    per block scale = fround(absmax / 127), q = round(v / scale) ∈ [-127, 127],
//           y = q·scale; |v − y| ≤ scale/2. Block 256.             n + 4·ceil(n/256)
//   int4    per block scale = fround(absmax / 7), q ∈ [-7, 7], two per byte, low nibble
//           first, nibble = q + 8; |v − y| ≤ scale/2. Block 128. ceil(n/2) + 4·ceil(n/128)
//   sign1   one bit per element, LSB first, set = negative; per block scale = mean |v|
//           (EF-SignSGD), y = ±scale. Block 256.                  ceil(n/8) + 4·ceil(n/256)
//   topk:F  the k = max(1, ceil(F·n)) largest |v| as strictly increasing uint32 indices and
//           their float32 values (exact); y = 0 elsewhere. Ties are broken by index.   8k
// (`encodedBytes` adds the padding to align scales/indices to 4, as tensor.ts lays them.)
// Error feedback: with a residual r (same length as x), v = x + r is encoded and r := v − y
// in place, so what a step loses goes out in later steps: Σ_t y_t = Σ_t x_t − r_T (up to the
// float32 rounding of r). r stays bounded: int8/int4 |r| ≤ scale/2, bf16 |r| ≤ 2^-8·|v|,
// and sign1 and topk are contractions (‖v − y‖ < ‖v‖). Without feedback their error is
// biased and grows with the steps (test/codecs.test.ts). f32 with a residual sends x + r
// (a copy) and zeroes r.
// Non-finite input: an int8/int4/sign1 block holding NaN or ±Inf gets scale NaN, so all of
// it decodes as NaN; bf16 keeps NaN/±Inf per element; topk ranks NaN above ±Inf above every
// finite |v|, so they are kept. The receiver sees a non-finite value and can reject the
// push. The residual is reset to 0 wherever it would be non-finite (the whole block for the
// block codecs).
// Speed: rounding uses `(y ± 0.5) | 0` (3× Math.round, PERF-NOTES); topk selects by a
// two-pass radix histogram on the magnitudes' float32 bits (O(n), no sort, no worst case).
// Per 1M floats on the shared 2-core dev box (`node bench/wire.ts --codecs`): encode
// bf16 1.9 ms, int8 5.5, int4 7.2, sign1 2.9, topk 4.1; with error feedback 6.3, 8.2, 10.1,
// 4.3, 5.3; decode 1.1, 1.2, 1.6, 2.1, 0.2–0.6.

import { Result } from "effect"
import type { WireTensor } from "./tensor.ts"

export type CodecKind = "f32" | "bf16" | "int8" | "int4" | "sign1" | "topk"

export interface CodecSpec {
  readonly kind: CodecKind
  /** topk only: the fraction of elements kept, 0 < fraction ≤ 1. */
  readonly fraction?: number
  /** int8, int4, sign1: elements per scale (default DEFAULT_BLOCK[kind]). */
  readonly blockSize?: number
}

export const CODEC_KINDS: readonly CodecKind[] = ["f32", "bf16", "int8", "int4", "sign1", "topk"]
export const F32: CodecSpec = { kind: "f32" }

/** Elements per scale of the block codecs: int4 smaller, its 15 levels need a tighter absmax. */
export const DEFAULT_BLOCK: { readonly int8: number; readonly int4: number; readonly sign1: number } = { int8: 256, int4: 128, sign1: 256 }
/** int8's default block (the name codec.ts exported). */
export const DEFAULT_BLOCK_SIZE = DEFAULT_BLOCK.int8

const KNOWN = "f32, bf16, int8 (old name int8-block), int4, sign1, topk:<fraction in (0, 1]> (e.g. topk:0.01)"
const DECIMAL = /^(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i

/** A codec by name: f32, bf16, int8 (or int8-block), int4, sign1, topk:<fraction>. */
export const parseCodec = (name: string): Result.Result<CodecSpec, string> => {
  switch (name) {
    case "f32":
      return Result.succeed(F32)
    case "bf16":
    case "int8":
    case "int4":
    case "sign1":
      return Result.succeed({ kind: name })
    case "int8-block":
      return Result.succeed({ kind: "int8" })
  }
  if (typeof name === "string" && name.startsWith("topk")) {
    const s = name.slice(5)
    const f = name[4] === ":" && DECIMAL.test(s) ? Number(s) : NaN
    if (f > 0 && f <= 1) return Result.succeed({ kind: "topk", fraction: f })
    return Result.fail(`codec ${JSON.stringify(name)}: topk needs the fraction kept, a number in (0, 1], e.g. topk:0.01`)
  }
  return Result.fail(`unknown codec ${JSON.stringify(name)}: the known codecs are ${KNOWN}`)
}

const blockOf = (c: CodecSpec): number => {
  const bs = c.blockSize ?? (c.kind === "int8" || c.kind === "int4" || c.kind === "sign1" ? DEFAULT_BLOCK[c.kind] : 1)
  if (!Number.isSafeInteger(bs) || bs < 1) throw new RangeError(`codec ${c.kind}: blockSize must be a positive integer, got ${bs}`)
  return bs
}

const fractionOf = (c: CodecSpec): number => {
  const f = c.fraction
  if (f === undefined || !(f > 0 && f <= 1)) throw new RangeError(`codec topk: fraction must be in (0, 1], got ${f}`)
  return f
}

/** The canonical name of a codec ("topk:0.01"); blockSize is not part of it. */
export const codecName = (c: CodecSpec): string => {
  if (!CODEC_KINDS.includes(c.kind)) throw new RangeError(`unknown codec kind ${JSON.stringify(c.kind)}: one of ${CODEC_KINDS.join(", ")}`)
  return c.kind === "topk" ? `topk:${fractionOf(c)}` : c.kind
}

export const isLossy = (c: CodecSpec): boolean => c.kind !== "f32"

/** topk's k for n elements: max(1, ceil(fraction·n)), forgiving float noise (topk:0.07 of 100 keeps 7); 0 when n is 0. */
export const topkCount = (fraction: number, n: number): number =>
  n === 0 ? 0 : Math.min(n, Math.max(1, Math.ceil(fraction * n * (1 - 1e-12))))

const align4 = (n: number): number => Math.ceil(n / 4) * 4

/** Bytes a tensor of `numel` elements takes in a payload under `c`: data, padding to 4, scales or indices. */
export const encodedBytes = (c: CodecSpec, numel: number): number => {
  if (c.kind === "topk") return 8 * topkCount(fractionOf(c), numel)
  if (c.kind === "f32" || c.kind === "bf16") return (c.kind === "f32" ? 4 : 2) * numel
  const data = c.kind === "int8" ? numel : Math.ceil(numel / (c.kind === "int4" ? 2 : 8))
  return align4(data) + 4 * Math.ceil(numel / blockOf(c))
}

// ---------------------------------------------------------------------------------------
// Block absmax quantization (int8, int4)

export interface Quantized {
  readonly q: Int8Array
  /** One float32 scale per block: ceil(q.length / blockSize). */
  readonly scales: Float32Array
  readonly blockSize: number
}

/** q ∈ [-qmax, qmax] with per-block scale fround(absmax / qmax); residual as in the header. */
const quantizeBlocks = (x: Float32Array, residual: Float32Array | undefined, blockSize: number, qmax: number): Quantized => {
  if (!Number.isSafeInteger(blockSize) || blockSize < 1) throw new RangeError(`blockSize must be a positive integer, got ${blockSize}`)
  if (residual && residual.length !== x.length) throw new RangeError(`residual has ${residual.length} elements, x has ${x.length}`)
  const n = x.length
  const q = new Int8Array(n)
  const scales = new Float32Array(Math.ceil(n / blockSize))
  for (let b = 0, start = 0; start < n; b++, start += blockSize) {
    const end = Math.min(start + blockSize, n)
    let absmax = 0
    if (residual) {
      for (let i = start; i < end; i++) {
        const a = Math.abs(x[i] + residual[i])
        if (a > absmax || a !== a) absmax = a !== a ? NaN : a
      }
    } else {
      for (let i = start; i < end; i++) {
        const a = Math.abs(x[i])
        if (a > absmax || a !== a) absmax = a !== a ? NaN : a
      }
    }
    const scale = Math.fround(absmax / qmax)
    if (!Number.isFinite(scale)) {
      scales[b] = NaN // q stays 0
      if (residual) residual.fill(0, start, end)
      continue
    }
    scales[b] = scale
    if (scale === 0) {
      // all zeros (or subnormal dust that rounds to scale 0): q = 0, residual keeps v
      if (residual) for (let i = start; i < end; i++) residual[i] = x[i] + residual[i]
      continue
    }
    const inv = 1 / scale
    const lim = qmax | 0 // an int for the JIT: 12% faster than a plain number here
    if (residual) {
      for (let i = start; i < end; i++) {
        const v = x[i] + residual[i]
        const y = v * inv
        let k = y >= 0 ? (y + 0.5) | 0 : (y - 0.5) | 0
        k = k > lim ? lim : k < -lim ? -lim : k
        q[i] = k
        residual[i] = v - k * scale
      }
    } else {
      for (let i = start; i < end; i++) {
        const y = x[i] * inv
        const k = y >= 0 ? (y + 0.5) | 0 : (y - 0.5) | 0
        q[i] = k > lim ? lim : k < -lim ? -lim : k
      }
    }
  }
  return { q, scales, blockSize }
}

/** int8 block-absmax quantization of `x`; with `residual`, error feedback (updated in place). */
export const quantize = (x: Float32Array, residual?: Float32Array, blockSize = DEFAULT_BLOCK_SIZE): Quantized =>
  quantizeBlocks(x, residual, blockSize, 127)

const checkScales = (what: string, n: number, scales: Float32Array | undefined, blockSize: number | undefined): void => {
  const want = blockSize !== undefined && Number.isSafeInteger(blockSize) && blockSize >= 1 ? Math.ceil(n / blockSize) : -1
  if (want < 0) throw new RangeError(`${what}: needs a positive integer blockSize, got ${blockSize}`)
  if (!(scales instanceof Float32Array) || scales.length !== want) {
    throw new RangeError(`${what}: ${n} values in blocks of ${blockSize} need ${want} float32 scales, got ${scales?.length ?? "none"}`)
  }
}

/** q × scale of its block, into `out` (allocated when not given). */
export const dequantize = (q: Int8Array, scales: Float32Array, blockSize = DEFAULT_BLOCK_SIZE, out?: Float32Array): Float32Array => {
  const n = q.length
  checkScales("int8", n, scales, blockSize)
  const y = out ?? new Float32Array(n)
  if (y.length !== n) throw new RangeError(`out has ${y.length} elements, q has ${n}`)
  for (let b = 0, start = 0; start < n; b++, start += blockSize) {
    const end = Math.min(start + blockSize, n)
    const s = scales[b]
    for (let i = start; i < end; i++) y[i] = q[i] * s
  }
  return y
}

const packInt4 = (q: Int8Array): Uint8Array => {
  const n = q.length
  const p = new Uint8Array(Math.ceil(n / 2))
  let j = 0
  for (let i = 0; i + 1 < n; i += 2, j++) p[j] = (q[i] + 8) | ((q[i + 1] + 8) << 4)
  if (n % 2 === 1) p[j] = q[n - 1] + 8
  return p
}

const unpackInt4 = (p: Uint8Array, n: number, scales: Float32Array, blockSize: number, y: Float32Array): void => {
  for (let b = 0, start = 0; start < n; b++, start += blockSize) {
    const end = Math.min(start + blockSize, n)
    const s = scales[b]
    for (let i = start; i < end; i++) y[i] = (((p[i >> 1] >> ((i & 1) << 2)) & 15) - 8) * s
  }
}

// ---------------------------------------------------------------------------------------
// sign1: bits + per-block mean |v|

const signs = (x: Float32Array, r: Float32Array | undefined, blockSize: number): { bits: Uint8Array; scales: Float32Array } => {
  const n = x.length
  const bits = new Uint8Array(Math.ceil(n / 8))
  const scales = new Float32Array(Math.ceil(n / blockSize))
  for (let b = 0, start = 0; start < n; b++, start += blockSize) {
    const end = Math.min(start + blockSize, n)
    let sum = 0
    if (r) for (let i = start; i < end; i++) sum += Math.abs(x[i] + r[i])
    else for (let i = start; i < end; i++) sum += Math.abs(x[i])
    const s = Math.fround(sum / (end - start))
    if (!Number.isFinite(s)) {
      scales[b] = NaN
      if (r) r.fill(0, start, end)
      continue
    }
    scales[b] = s
    if (r) {
      for (let i = start; i < end; i++) {
        const v = x[i] + r[i]
        if (v < 0) {
          bits[i >> 3] |= 1 << (i & 7)
          r[i] = v + s
        } else r[i] = v - s
      }
    } else {
      for (let i = start; i < end; i++) if (x[i] < 0) bits[i >> 3] |= 1 << (i & 7)
    }
  }
  return { bits, scales }
}

const unsign = (bits: Uint8Array, n: number, scales: Float32Array, blockSize: number, y: Float32Array): void => {
  for (let b = 0, start = 0; start < n; b++, start += blockSize) {
    const end = Math.min(start + blockSize, n)
    const s = scales[b]
    const ns = -s
    for (let i = start; i < end; i++) y[i] = (bits[i >> 3] >> (i & 7)) & 1 ? ns : s
  }
}

// ---------------------------------------------------------------------------------------
// bf16

// Float bits are read through Int32Array views: a Uint32Array element ≥ 2^31 (every
// negative float) is a heap number in V8, 3× slower. Rounding to nearest even is
// (b + 0x7fff + bit 16 of b) >> 16, branch-free; NaNs (whose rounding could carry into the
// sign or give ±Inf) are noticed with an OR of |b| + 0x7fffff (its sign bit is set iff some
// |b| > 0x7f800000) and fixed in a second pass, only then: 1.6× faster than a branch.

const toBf16 = (x: Float32Array, r: Float32Array | undefined): Uint16Array => {
  const n = x.length
  const h = new Uint16Array(n)
  if (r) {
    const u = new Int32Array(r.buffer, r.byteOffset, n)
    for (let i = 0; i < n; i++) {
      r[i] = x[i] + r[i] // v, rounded to float32, read back as bits
      const v = r[i]
      const b = u[i]
      const hb = (b + 0x7fff + ((b >> 16) & 1)) >> 16
      h[i] = hb
      u[i] = hb << 16 // r[i] is now y
      const e = v - r[i]
      if (e - e === 0) r[i] = e
      else {
        r[i] = 0 // v or y non-finite (NaN, ±Inf, overflow): reset
        if (v !== v) h[i] = (b >> 16) | 0x40 // a quiet NaN of the same sign
      }
    }
    return h
  }
  const u = new Int32Array(x.buffer, x.byteOffset, n)
  let nan = 0
  for (let i = 0; i < n; i++) {
    const b = u[i]
    nan |= (b & 0x7fffffff) + 0x7fffff
    h[i] = (b + 0x7fff + ((b >> 16) & 1)) >> 16
  }
  if (nan < 0) {
    for (let i = 0; i < n; i++) {
      const b = u[i]
      if ((b & 0x7fffffff) > 0x7f800000) h[i] = (b >> 16) | 0x40
    }
  }
  return h
}

// ---------------------------------------------------------------------------------------
// topk: radix select on the magnitudes' bits (for |v| as float32, bits order = value order,
// and NaN's bits are above +Inf's)

const HI = new Uint32Array(1 << 15) // scratch histograms, cleared on every use
const LO = new Uint32Array(1 << 16)

/** The magnitude bits t of the k-th largest |v|, and how many elements are strictly above it. */
const kthLargest = (u: Int32Array, k: number): { t: number; above: number } => {
  const n = u.length
  HI.fill(0)
  LO.fill(0)
  for (let i = 0; i < n; i++) HI[(u[i] >>> 16) & 0x7fff]++
  let above = 0
  let hi = 0x7fff
  for (; hi > 0 && above + HI[hi] < k; hi--) above += HI[hi]
  for (let i = 0; i < n; i++) if (((u[i] >>> 16) & 0x7fff) === hi) LO[u[i] & 0xffff]++
  let lo = 0xffff
  for (; lo > 0 && above + LO[lo] < k; lo--) above += LO[lo]
  return { t: (hi << 16) | lo, above }
}

const topk = (x: Float32Array, r: Float32Array | undefined, fraction: number): { values: Float32Array; indices: Uint32Array } => {
  const n = x.length
  const k = topkCount(fraction, n)
  const values = new Float32Array(k)
  const indices = new Uint32Array(k)
  if (k === 0) return { values, indices }
  let v = x
  if (r) {
    for (let i = 0; i < n; i++) r[i] = x[i] + r[i]
    v = r
  }
  const u = new Int32Array(v.buffer, v.byteOffset, n)
  const { t, above } = kthLargest(u, k)
  let ties = k - above
  for (let i = 0, j = 0; i < n; i++) {
    const m = u[i] & 0x7fffffff
    if (m > t || (m === t && ties-- > 0)) {
      indices[j] = i
      values[j++] = v[i]
      if (r) r[i] = 0
    } else if (r && m >= 0x7f800000) r[i] = 0
  }
  return { values, indices }
}

// ---------------------------------------------------------------------------------------
// The registry's two entry points

const typeName = (x: unknown): string => (x as { constructor?: { name?: string } } | undefined)?.constructor?.name ?? "none"

const numelOf = (what: string, shape: ReadonlyArray<number>): number => {
  let n = 1
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) throw new RangeError(`${what}: shape [${shape}] is not a list of non-negative integers`)
    n *= d
  }
  return n
}

/**
 * `data` (float32, row-major `shape`) as a wire tensor under `c`. With `residual` (same
 * length), error feedback: v = data + residual is encoded and residual := v − decode, in place.
 * f32 without a residual shares `data`.
 */
export const encodeTensor = (
  c: CodecSpec,
  name: string,
  shape: ReadonlyArray<number>,
  data: Float32Array,
  residual?: Float32Array
): WireTensor => {
  const what = `tensor ${JSON.stringify(name)}`
  const n = numelOf(what, shape)
  if (data.length !== n) throw new RangeError(`${what}: shape [${shape}] has ${n} elements, data has ${data.length}`)
  if (residual && residual.length !== n) throw new RangeError(`${what}: residual has ${residual.length} elements, data has ${n}`)
  switch (c.kind) {
    case "f32": {
      if (!residual) return { name, dtype: "float32", shape, data }
      const v = new Float32Array(n)
      for (let i = 0; i < n; i++) v[i] = data[i] + residual[i]
      residual.fill(0)
      return { name, dtype: "float32", shape, data: v }
    }
    case "bf16":
      return { name, dtype: "bf16", shape, data: toBf16(data, residual) }
    case "int8": {
      const { q, scales, blockSize } = quantizeBlocks(data, residual, blockOf(c), 127)
      return { name, dtype: "int8", shape, data: q, scales, blockSize }
    }
    case "int4": {
      const { q, scales, blockSize } = quantizeBlocks(data, residual, blockOf(c), 7)
      return { name, dtype: "int4", shape, data: packInt4(q), scales, blockSize }
    }
    case "sign1": {
      const blockSize = blockOf(c)
      const { bits, scales } = signs(data, residual, blockSize)
      return { name, dtype: "sign1", shape, data: bits, scales, blockSize }
    }
    case "topk": {
      const { values, indices } = topk(data, residual, fractionOf(c))
      return { name, dtype: "topk", shape, data: values, indices }
    }
    default:
      throw new RangeError(`${what}: unknown codec kind ${JSON.stringify((c as CodecSpec).kind)}: one of ${CODEC_KINDS.join(", ")}`)
  }
}

/** Why topk `indices` do not fit `numel` (k in [1, numel], strictly increasing, each < numel), or undefined. */
export const badIndices = (indices: Uint32Array, numel: number): string | undefined => {
  const k = indices.length
  if (k > numel || (k === 0 && numel > 0)) return `k = ${k} kept values must be in [1, ${numel}] (numel)`
  for (let j = 0, prev = -1; j < k; j++) {
    const i = indices[j]
    if (i <= prev || i >= numel) return `indices[${j}] = ${i} must be > ${prev} (strictly increasing) and < ${numel} (numel)`
    prev = i
  }
  return undefined
}

/**
 * The float32 values of any float wire tensor, into `out` when given (numel elements; for
 * topk it is zeroed first): float32 as is (the data itself when there is no `out`), bf16
 * widened, int8/int4/sign1 dequantized, topk scattered into zeros. Throws a RangeError that
 * names the problem for an inconsistent tensor (an int32 one included: ids are not floats).
 */
export const decodeTensor = (t: WireTensor, out?: Float32Array): Float32Array => {
  const what = `${t.dtype} tensor ${JSON.stringify(t.name)}`
  const n = numelOf(what, t.shape)
  const d = t.data
  const need = (ok: boolean, array: string, length: number) => {
    if (!ok || d.length !== length) throw new RangeError(`${what}: shape [${t.shape}] needs a ${array} of ${length}, got ${typeName(d)} of ${d?.length}`)
  }
  if (out && out.length !== n) throw new RangeError(`${what}: out has ${out.length} elements, the tensor ${n}`)
  if (t.dtype === "float32") {
    need(d instanceof Float32Array, "Float32Array", n)
    return out ? (out.set(d), out) : (d as Float32Array)
  }
  const y = out ?? new Float32Array(n)
  switch (t.dtype) {
    case "bf16": {
      need(d instanceof Uint16Array, "Uint16Array", n)
      const yu = new Int32Array(y.buffer, y.byteOffset, n)
      for (let i = 0; i < n; i++) yu[i] = d[i] << 16
      return y
    }
    case "int8":
      need(d instanceof Int8Array, "Int8Array", n)
      checkScales(what, n, t.scales, t.blockSize)
      return dequantize(d as Int8Array, t.scales!, t.blockSize, y)
    case "int4":
    case "sign1":
      need(d instanceof Uint8Array, "Uint8Array", Math.ceil(n / (t.dtype === "int4" ? 2 : 8)))
      checkScales(what, n, t.scales, t.blockSize)
      if (t.dtype === "int4") unpackInt4(d as Uint8Array, n, t.scales!, t.blockSize!, y)
      else unsign(d as Uint8Array, n, t.scales!, t.blockSize!, y)
      return y
    case "topk": {
      const idx = t.indices
      if (!(idx instanceof Uint32Array)) throw new RangeError(`${what}: topk needs a Uint32Array of indices, got ${typeName(idx)}`)
      const k = idx.length
      need(d instanceof Float32Array, "Float32Array", k)
      const bad = badIndices(idx, n)
      if (bad !== undefined) throw new RangeError(`${what}: ${bad}`)
      if (out) out.fill(0)
      for (let j = 0; j < k; j++) y[idx[j]] = d[j]
      return y
    }
    default:
      throw new RangeError(`${what}: not a float tensor (int32 holds ids) or an unknown dtype`)
  }
}
