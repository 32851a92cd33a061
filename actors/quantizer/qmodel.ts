/**
 * Implements: a quantized model in memory — its tensors (int8 per output channel, int4 per
 * group along the input dimension, or float32), quantizing a trained model's params into
 * them, dequantizing one tensor (or some rows of an embedding) at its use, and the
 * activation quantizer each int8 matmul input goes through (dynamic, static, observing
 * for calibration).
 * Does not own: the forward passes that use them (qforward.ts), the file format
 * (qfile.ts), the PTQ pipeline and its report (ptq.ts), the float models (shared/models).
 *
 * Shapes: a quantized tensor is 2-D [R, K] row-major. Two layouts name where its output
 * channel is, so that every scale covers values along the dimension a matmul reduces:
 *   cols  a linear kernel [in, out] (y = x @ W): channel = column j, groups run down the
 *         column (rows i = the input dim). Scale of (i, j): scales[⌊i/g⌋·K + j].
 *   rows  an embedding [V, C] (a lookup; the GPT's tied head computes x @ wteᵀ, so its
 *         input dim is C): channel = row i, groups run along the row. Scale of (i, j):
 *         scales[i·⌈K/g⌉ + ⌊j/g⌋].
 * g (`group`) is the channel's whole length for int8 (one scale per channel) and
 * DEFAULT_GROUP (32) for int4. Quantization is symmetric absmax: scale = max|v| / Q,
 * q = round(v / scale) clamped to [−Q, Q], Q = 127 (int8) or 7 (int4); value = q · scale.
 * int4 packs two values per byte, element 2k in the low nibble and 2k+1 in the high one
 * (row-major element order), each as a 4-bit two's complement number.
 * What stays float32: biases, LayerNorm gains and biases, and any tensor smaller than
 * MIN_QUANT_ELEMENTS (the classifier's [64, 1] output kernel).
 */
import * as tf from "@tensorflow/tfjs"
import type { GptModel, LstmModel } from "../../shared/config/job.ts"
import { sizeOf, type ModelDef, type ParamSpec } from "../../shared/models/model.ts"

export const QUANT_MODES = ["int8-dynamic", "int8-static", "int4-weight"] as const
export type QuantMode = (typeof QUANT_MODES)[number]
export const isQuantMode = (m: unknown): m is QuantMode => (QUANT_MODES as readonly unknown[]).includes(m)

export type QDType = "float32" | "int8" | "int4"
export type Layout = "rows" | "cols"

/** Defaults, in one place. */
export const DEFAULT_GROUP = 32 // int4: values per scale along the input dim (6.4× smaller than float32 with f32 scales)
export const MIN_QUANT_ELEMENTS = 1024 // smaller tensors stay float32: their scales would cost more than they save
export const INT8_MAX = 127
export const INT4_MAX = 7

export interface QTensor {
  readonly name: string
  readonly shape: readonly number[]
  readonly dtype: QDType
  /** int8/int4: where the output channel is (see the top of this file) */
  readonly layout?: Layout
  /** int8/int4: values per scale along the input dim */
  readonly group?: number
  /** float32: the values; int8: one per value; int4: two per byte */
  readonly data: Float32Array | Int8Array | Uint8Array
  /** int8/int4: float32 scales, in the order the layout says */
  readonly scales?: Float32Array
}

/** A model's tensors as one of QUANT_MODES stores them ("float32": nothing quantized, the reference). */
export interface QModel {
  readonly def: ModelDef
  /** the model block (shared/config/job.ts) `def` was made from */
  readonly model: GptModel | LstmModel
  readonly mode: QuantMode | "float32"
  readonly tensors: ReadonlyMap<string, QTensor>
  /** int8-static: the calibrated absmax of each activation site (the weight name it multiplies) */
  readonly activations?: Readonly<Record<string, number>>
}

/** Where a tensor's output channel is, or undefined when it stays float32 (biases, LayerNorm, small ones). */
export const layoutOf = (def: ModelDef, s: ParamSpec): Layout | undefined => {
  if (s.shape.length !== 2 || sizeOf(s.shape) < MIN_QUANT_ELEMENTS) return undefined
  if (def.kind === "gpt") {
    if (s.name === "wte" || s.name === "wpe") return "rows"
    return /\.(c_attn|c_proj|c_fc)\.weight$/.test(s.name) ? "cols" : undefined
  }
  if (def.kind === "lstm-classifier") {
    if (s.name === "embedding") return "rows"
    return s.name.endsWith(".kernel") || s.name === "lstm.recurrent" ? "cols" : undefined
  }
  throw new Error(`quantize: model kind ${def.kind} has no quantization layout (gpt and lstm-classifier have)`)
}

/** Tensors read only by a lookup (no matmul, so no activation to quantize). */
const LOOKUP_ONLY = new Set(["wpe", "embedding"])

/** The activation sites: the int8 weights a matmul multiplies (named by that weight). */
export const activationSites = (qm: Pick<QModel, "tensors">): string[] =>
  [...qm.tensors.values()].filter((t) => t.dtype === "int8" && !LOOKUP_ONLY.has(t.name)).map((t) => t.name)

/** The number of scales of a [R, K] tensor with this layout and group. */
export const scaleCount = (shape: readonly number[], layout: Layout, group: number): number => {
  const [R, K] = shape
  return layout === "rows" ? R * Math.ceil(K / group) : Math.ceil(R / group) * K
}

/** Bytes of a tensor's values (not its scales). */
export const dataBytes = (dtype: QDType, n: number): number => (dtype === "float32" ? 4 * n : dtype === "int8" ? n : Math.ceil(n / 2))

/** Quantize one [R, K] float32 tensor. */
export const quantizeTensor = (name: string, shape: readonly number[], v: Float32Array, dtype: "int8" | "int4", layout: Layout, group?: number): QTensor => {
  if (shape.length !== 2 || v.length !== shape[0] * shape[1]) throw new Error(`quantize ${name}: expected a 2-D tensor, got shape [${shape}] with ${v.length} values`)
  const [R, K] = shape
  const g = dtype === "int8" ? (layout === "rows" ? K : R) : (group ?? DEFAULT_GROUP)
  if (!Number.isInteger(g) || g < 1) throw new Error(`quantize ${name}: group must be a positive integer, got ${g}`)
  const Q = dtype === "int8" ? INT8_MAX : INT4_MAX
  const ng = Math.ceil(K / g)
  const sIdx = layout === "rows" ? (i: number, j: number) => i * ng + Math.floor(j / g) : (i: number, j: number) => Math.floor(i / g) * K + j
  const scales = new Float32Array(scaleCount(shape, layout, g))
  for (let i = 0; i < R; i++) {
    for (let j = 0; j < K; j++) {
      const a = Math.abs(v[i * K + j])
      if (!Number.isFinite(a)) throw new Error(`quantize ${name}: value [${i}, ${j}] is ${v[i * K + j]}; a checkpoint with non-finite weights cannot be quantized`)
      const k = sIdx(i, j)
      if (a > scales[k]) scales[k] = a
    }
  }
  for (let k = 0; k < scales.length; k++) scales[k] = scales[k] / Q
  const q = dtype === "int8" ? new Int8Array(R * K) : new Uint8Array(Math.ceil((R * K) / 2))
  for (let i = 0; i < R; i++) {
    for (let j = 0; j < K; j++) {
      const s = scales[sIdx(i, j)]
      const e = i * K + j
      const x = s === 0 ? 0 : Math.max(-Q, Math.min(Q, Math.round(v[e] / s)))
      if (dtype === "int8") q[e] = x
      else q[e >> 1] |= (x & 0xf) << ((e & 1) * 4)
    }
  }
  return { name, shape, dtype, layout, group: g, data: q, scales }
}

const nibble = (b: Uint8Array, e: number): number => {
  const n = (b[e >> 1] >> ((e & 1) * 4)) & 0xf
  return n >= 8 ? n - 16 : n
}

/** Rows `rows` of a tensor as float32 [rows.length, K] (every row when absent). */
export const dequantizeRows = (t: QTensor, rows?: ArrayLike<number>): Float32Array => {
  const [R, K] = t.shape.length === 2 ? t.shape : [1, sizeOf(t.shape)]
  const n = rows === undefined ? R : rows.length
  const out = new Float32Array(n * K)
  const s = t.scales!
  const g = t.group ?? K
  const ng = Math.ceil(K / g)
  for (let r = 0; r < n; r++) {
    const i = rows === undefined ? r : rows[r]
    if (!(i >= 0 && i < R)) throw new RangeError(`${t.name}: row ${i} outside [0, ${R})`)
    const o = r * K
    const e0 = i * K
    if (t.dtype === "float32") out.set((t.data as Float32Array).subarray(e0, e0 + K), o)
    else if (t.dtype === "int8") {
      const q = t.data as Int8Array
      if (t.layout === "rows") for (let j = 0; j < K; j++) out[o + j] = q[e0 + j] * s[i * ng + Math.floor(j / g)]
      else for (let j = 0; j < K; j++) out[o + j] = q[e0 + j] * s[j]
    } else {
      const b = t.data as Uint8Array
      if (t.layout === "rows") for (let j = 0; j < K; j++) out[o + j] = nibble(b, e0 + j) * s[i * ng + Math.floor(j / g)]
      else {
        const so = Math.floor(i / g) * K
        for (let j = 0; j < K; j++) out[o + j] = nibble(b, e0 + j) * s[so + j]
      }
    }
  }
  return out
}

/** The whole tensor as float32 values. */
export const dequantize = (t: QTensor): Float32Array => (t.dtype === "float32" ? (t.data as Float32Array) : dequantizeRows(t))

const tensorOf = (qm: Pick<QModel, "tensors">, name: string): QTensor => {
  const t = qm.tensors.get(name)
  if (t === undefined) throw new Error(`quantized model: missing tensor "${name}"`)
  return t
}

/** A tensor dequantized into a transient tf tensor, right before its use (call inside a tidy). */
export const weight = (qm: Pick<QModel, "tensors">, name: string): tf.Tensor => {
  const t = tensorOf(qm, name)
  return tf.tensor(dequantize(t), [...t.shape], "float32")
}

/** Some rows of a [R, K] tensor (an embedding lookup) as a tf tensor [ids.length, K]; only those rows are dequantized. */
export const weightRows = (qm: Pick<QModel, "tensors">, name: string, ids: ArrayLike<number>): tf.Tensor2D => {
  const t = tensorOf(qm, name)
  return tf.tensor2d(dequantizeRows(t, ids), [ids.length, t.shape[1]], "float32")
}

export const isInt8 = (qm: Pick<QModel, "tensors">, name: string): boolean => tensorOf(qm, name).dtype === "int8"

/**
 * Quantize a trained model's params for `mode` (int8 modes: int8 per output channel;
 * int4-weight: int4 per `group` values along the input dim); the rest stays float32.
 * `mode` "float32" keeps everything float (the reference the forward is tested against).
 */
export const quantizeModel = (
  def: ModelDef,
  model: GptModel | LstmModel,
  params: ReadonlyMap<string, Float32Array>,
  mode: QuantMode | "float32",
  group = DEFAULT_GROUP
): QModel => {
  const tensors = new Map<string, QTensor>()
  for (const s of def.specs) {
    const v = params.get(s.name)
    if (v === undefined) throw new Error(`quantize: the params lack "${s.name}"`)
    const layout = mode === "float32" ? undefined : layoutOf(def, s)
    tensors.set(
      s.name,
      layout === undefined
        ? { name: s.name, shape: s.shape, dtype: "float32", data: v }
        : quantizeTensor(s.name, s.shape, v, mode === "int4-weight" ? "int4" : "int8", layout, group)
    )
  }
  return { def, model, mode, tensors }
}

// ---------------------------------------------------------------- activations

/**
 * How a matmul input is treated: left float (float32, int4-weight), rounded to the int8
 * grid with its own per-tensor absmax computed on the fly (int8-dynamic) or with a fixed,
 * calibrated absmax and clamped outside it (int8-static), or left float while its absmax
 * is recorded (calibration).
 */
export type Activations =
  | { readonly kind: "float" }
  | { readonly kind: "dynamic" }
  | { readonly kind: "static"; readonly ranges: Readonly<Record<string, number>> }
  | { readonly kind: "observe"; readonly ranges: Map<string, number> }

export const activationsFor = (qm: QModel): Activations => {
  if (qm.mode === "int8-dynamic") return { kind: "dynamic" }
  if (qm.mode === "int8-static") {
    if (qm.activations === undefined) throw new Error("int8-static model without calibrated activation ranges")
    return { kind: "static", ranges: qm.activations }
  }
  return { kind: "float" }
}

/** Smallest scale used, so an all-zero input stays zero instead of dividing by zero. */
const TINY = 1e-30

/** x: any shape → the same shape, rounded to the int8 grid of `site`'s scale (fake quantization). Call inside a tidy. */
export const quantizeActivation = (a: Activations, site: string, x: tf.Tensor): tf.Tensor => {
  switch (a.kind) {
    case "float":
      return x
    case "observe": {
      const m = tf.max(tf.abs(x)).dataSync()[0]
      a.ranges.set(site, Math.max(a.ranges.get(site) ?? 0, m))
      return x
    }
    case "dynamic": {
      const s = tf.maximum(tf.div(tf.max(tf.abs(x)), INT8_MAX), TINY) // [] per-tensor scale of this batch
      return tf.mul(tf.clipByValue(tf.round(tf.div(x, s)), -INT8_MAX, INT8_MAX), s)
    }
    case "static": {
      const r = a.ranges[site]
      if (r === undefined) throw new Error(`int8-static: no calibrated range for activation site "${site}"`)
      const s = Math.max(r / INT8_MAX, TINY)
      return tf.mul(tf.clipByValue(tf.round(tf.div(x, s)), -INT8_MAX, INT8_MAX), s)
    }
  }
}
