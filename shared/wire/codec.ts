// Implements: int8 block-absmax quantization of float32 tensors for the wire, with optional
// error feedback, and `toWire` / `fromWire` to go between plain Float32Arrays and
// WireTensors under a codec ("f32" or "int8-block").
// Does not own: the payload layout (tensor.ts); which tensors get quantized and the
// long-lived residuals (the quantizer actor keeps one residual per tensor and passes it in).
//
// Scheme: x is cut into blocks of `blockSize` consecutive elements (default 256; the last
// block may be shorter). Per block, scale = fround(max|v| / 127) and q = round(v / scale)
// in [-127, 127] (-128 is never produced), so |v - q·scale| ≤ scale/2. A block of zeros has
// scale 0. A block holding NaN or ±Infinity gets scale NaN and q = 0: the receiver sees
// NaN for that block (and can reject it), and the residual of that block is reset to 0.
// Error feedback: with a residual r, v = x + r is quantized and r becomes v - q·scale, so
// what was lost this step is sent next step: Σ_t dequant_t tracks Σ_t x_t within one step's
// error. Rounding uses `(y ± 0.5) | 0` (3× faster than Math.round, PERF-NOTES).

import type { Codec, WireTensor } from "./tensor.ts"

export const DEFAULT_BLOCK_SIZE = 256

export interface Quantized {
  readonly q: Int8Array
  /** One float32 scale per block: ceil(q.length / blockSize). */
  readonly scales: Float32Array
  readonly blockSize: number
}

/**
 * Quantize `x` to int8 with per-block absmax scales. When `residual` (same length as `x`)
 * is given, it is added to `x` first and overwritten with the new quantization error.
 */
export const quantize = (x: Float32Array, residual?: Float32Array, blockSize = DEFAULT_BLOCK_SIZE): Quantized => {
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
    if (!Number.isFinite(absmax)) {
      scales[b] = NaN // q stays 0
      if (residual) residual.fill(0, start, end)
      continue
    }
    const scale = Math.fround(absmax / 127)
    scales[b] = scale
    if (scale === 0) {
      // all zeros (or subnormal dust that rounds to scale 0): q = 0, residual keeps v
      if (residual) for (let i = start; i < end; i++) residual[i] = x[i] + residual[i]
      continue
    }
    const inv = 1 / scale
    if (residual) {
      for (let i = start; i < end; i++) {
        const v = x[i] + residual[i]
        const y = v * inv
        let k = y >= 0 ? (y + 0.5) | 0 : (y - 0.5) | 0
        k = k > 127 ? 127 : k < -127 ? -127 : k
        q[i] = k
        residual[i] = v - k * scale
      }
    } else {
      for (let i = start; i < end; i++) {
        const y = x[i] * inv
        const k = y >= 0 ? (y + 0.5) | 0 : (y - 0.5) | 0
        q[i] = k > 127 ? 127 : k < -127 ? -127 : k
      }
    }
  }
  return { q, scales, blockSize }
}

/** q × scale of its block, into `out` (allocated when not given). */
export const dequantize = (q: Int8Array, scales: Float32Array, blockSize = DEFAULT_BLOCK_SIZE, out?: Float32Array): Float32Array => {
  const n = q.length
  if (scales.length !== Math.ceil(n / blockSize)) {
    throw new RangeError(`${n} values in blocks of ${blockSize} need ${Math.ceil(n / blockSize)} scales, got ${scales.length}`)
  }
  const y = out ?? new Float32Array(n)
  if (y.length !== n) throw new RangeError(`out has ${y.length} elements, q has ${n}`)
  for (let b = 0, start = 0; start < n; b++, start += blockSize) {
    const end = Math.min(start + blockSize, n)
    const s = scales[b]
    for (let i = start; i < end; i++) y[i] = q[i] * s
  }
  return y
}

export interface ToWireOptions {
  /** Error-feedback residual for this tensor (int8-block only), updated in place. */
  readonly residual?: Float32Array
  readonly blockSize?: number
}

/** A float32 tensor as it goes on the wire under `codec` ("f32" shares `data`, no copy). */
export const toWire = (
  name: string,
  shape: ReadonlyArray<number>,
  data: Float32Array,
  codec: Codec,
  opts: ToWireOptions = {}
): WireTensor => {
  if (codec === "f32") return { name, dtype: "float32", shape, data }
  const { q, scales, blockSize } = quantize(data, opts.residual, opts.blockSize ?? DEFAULT_BLOCK_SIZE)
  return { name, dtype: "int8", shape, data: q, scales, blockSize }
}

/** The float32 values of a wire tensor (float32: its data as is; int8: dequantized). */
export const fromWire = (t: WireTensor, out?: Float32Array): Float32Array => {
  if (t.dtype === "float32") return t.data as Float32Array
  if (!t.scales || t.blockSize === undefined) throw new RangeError(`int8 tensor ${t.name} has no scales`)
  return dequantize(t.data as Int8Array, t.scales, t.blockSize, out)
}
