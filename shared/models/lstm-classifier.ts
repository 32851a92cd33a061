// Implements: the seed project's binary text classifier, Embedding -> LSTM -> Dense(relu)
// -> Dense(1), trained with binary cross-entropy from logits (sigmoid at the end is
// folded into the loss). Written as plain tfjs ops over named parameters (the LSTM cell
// is spelled out: gates i, f, g, o), so it plugs into the same ModelDef contract as gpt.ts.
// Owns: the classifier's maths, config defaults, param names/shapes and init. Does not
// own: tokenisation/padding (the data loader) or training.
//
// Shapes, used in every comment below:
//   B batch size, L sequence length, V vocab size, E embedding width, H LSTM units,
//   F width of the hidden dense layer.
//
// Padding: token id 0 is padding. With `maskPadding` (default, Keras `mask_zero=True`)
// a padded step leaves the LSTM state unchanged, so pre- and post-padding are alike.

import * as tf from "@tensorflow/tfjs"
import { linear, matMul2d, sigmoidCrossEntropy } from "../compute/ops.ts"
import type { ModelDef, ParamSpec } from "./model.ts"
import { sizeOf } from "./model.ts"
import { Rng } from "./rng.ts"

export interface LstmClassifierConfig {
  /** V: ids 1..V-1 are words, 0 is padding. */
  readonly vocabSize: number
  /** E */
  readonly embedDim: number
  /** H: LSTM units. */
  readonly hidden: number
  /** F: units of the ReLU dense layer. */
  readonly dense: number
  /** Skip the LSTM update on padding (id 0) steps. */
  readonly maskPadding: boolean
}

export const lstmClassifierDefaults: LstmClassifierConfig = {
  vocabSize: 10_000, // the seed's IMDB-style word vocabulary
  embedDim: 64,
  hidden: 64,
  dense: 64,
  maskPadding: true
}

/** Small enough for finite-difference gradient checks. */
export const lstmTiny: LstmClassifierConfig = { vocabSize: 11, embedDim: 4, hidden: 5, dense: 3, maskPadding: true }

export interface LstmBatch {
  /** B rows of L token ids, row-major (length B*L); 0 = padding. */
  readonly x: Int32Array
  /** B labels in {0, 1}. */
  readonly y: Float32Array
  readonly B: number
  readonly L: number
}

export interface LstmClassifierDef extends ModelDef<LstmBatch> {
  readonly kind: "lstm-classifier"
  readonly config: LstmClassifierConfig
}

export const resolveLstmConfig = (config: Partial<LstmClassifierConfig> = {}): LstmClassifierConfig => {
  const c = { ...lstmClassifierDefaults, ...config }
  for (const k of ["vocabSize", "embedDim", "hidden", "dense"] as const) {
    if (!Number.isInteger(c[k]) || c[k] < 1) throw new Error(`lstm-classifier: ${k} must be a positive integer, got ${c[k]}`)
  }
  return c
}

/** Names follow Keras' layers. Gate blocks inside kernel/recurrent/bias are [i, f, g, o]. */
export const lstmSpecs = (c: LstmClassifierConfig): ParamSpec[] => [
  { name: "embedding", shape: [c.vocabSize, c.embedDim] }, // [V, E]
  { name: "lstm.kernel", shape: [c.embedDim, 4 * c.hidden] }, // [E, 4H]
  { name: "lstm.recurrent", shape: [c.hidden, 4 * c.hidden] }, // [H, 4H]
  { name: "lstm.bias", shape: [4 * c.hidden] }, // [4H]
  { name: "dense.kernel", shape: [c.hidden, c.dense] }, // [H, F]
  { name: "dense.bias", shape: [c.dense] }, // [F]
  { name: "out.kernel", shape: [c.dense, 1] }, // [F, 1]
  { name: "out.bias", shape: [1] } // [1]
]

/** Rows-orthonormal [n, n] block (Gram-Schmidt on Gaussian rows), written into
 *  `out` (row stride `stride`, starting at column `col`). Keras' orthogonal init. */
const orthogonalBlock = (rng: Rng, n: number, out: Float32Array, stride: number, col: number) => {
  const rows: Float64Array[] = []
  for (let i = 0; i < n; i++) {
    let r: Float64Array
    let norm = 0
    do {
      r = Float64Array.from({ length: n }, () => rng.normal())
      for (const q of rows) {
        let dot = 0
        for (let j = 0; j < n; j++) dot += r[j] * q[j]
        for (let j = 0; j < n; j++) r[j] -= dot * q[j]
      }
      norm = Math.hypot(...r)
    } while (norm < 1e-6)
    for (let j = 0; j < n; j++) r[j] /= norm
    rows.push(r)
  }
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) out[i * stride + col + j] = rows[i][j]
}

/** Keras defaults: embedding U(-0.05, 0.05), kernels Glorot-uniform, recurrent
 *  orthogonal (per gate), biases 0 except the forget gate's 1 (unit_forget_bias). */
export const lstmInit = (c: LstmClassifierConfig, specs: readonly ParamSpec[], seed: number): Map<string, Float32Array> => {
  const rng = new Rng(seed)
  const H = c.hidden
  const glorot = (v: Float32Array, fanIn: number, fanOut: number) => rng.fillUniform(v, Math.sqrt(6 / (fanIn + fanOut)))
  const out = new Map<string, Float32Array>()
  for (const s of specs) {
    const v = new Float32Array(sizeOf(s.shape))
    if (s.name === "embedding") rng.fillUniform(v, 0.05)
    else if (s.name === "lstm.recurrent") for (let g = 0; g < 4; g++) orthogonalBlock(rng, H, v, 4 * H, g * H)
    else if (s.name === "lstm.bias") v.fill(1, H, 2 * H)
    else if (s.name.endsWith(".kernel")) glorot(v, s.shape[0], s.shape[1])
    out.set(s.name, v)
  }
  return out
}

type Params = ReadonlyMap<string, tf.Tensor>
const get = (p: Params, name: string): tf.Tensor => {
  const t = p.get(name)
  if (t === undefined) throw new Error(`lstm-classifier: missing parameter "${name}"`)
  return t
}

/** Forward pass. x: [B, L] int32 ids -> logits [B] (sigmoid gives P(y = 1)). */
export const lstmLogits = (c: LstmClassifierConfig, p: Params, x: tf.Tensor2D): tf.Tensor1D => {
  const [B, L] = x.shape
  const H = c.hidden
  const emb = tf.gather(get(p, "embedding"), tf.reshape(x, [B * L])) // [B*L, E]
  // Input projection for every step at once: one big plain matMul instead of L small ones.
  const xz = tf.reshape(linear(emb as tf.Tensor2D, get(p, "lstm.kernel"), get(p, "lstm.bias")), [B, L, 4 * H])
  // Time-major before unstacking: per-step slices along axis 0 are contiguous copies,
  // while unstacking axis 1 on wasm takes a strided path (~1 s for B=32, L=100).
  const steps = tf.unstack(tf.transpose(xz, [1, 0, 2])) as tf.Tensor2D[] // L x [B, 4H]
  const masks = c.maskPadding
    ? (tf.unstack(tf.reshape(tf.cast(tf.notEqual(tf.transpose(x), 0), "float32"), [L, B, 1])) as tf.Tensor2D[]) // L x [B, 1]
    : undefined
  const U = get(p, "lstm.recurrent") as tf.Tensor2D // [H, 4H]
  let h = tf.zeros([B, H]) as tf.Tensor2D // [B, H]
  let cell = tf.zeros([B, H]) as tf.Tensor2D // [B, H]
  for (let t = 0; t < L; t++) {
    const z = tf.add(steps[t], matMul2d(h, U)) // [B, 4H]
    const [zi, zf, zg, zo] = tf.split(z, 4, 1) // each [B, H]
    const cNew = tf.add(tf.mul(tf.sigmoid(zf), cell), tf.mul(tf.sigmoid(zi), tf.tanh(zg))) as tf.Tensor2D
    const hNew = tf.mul(tf.sigmoid(zo), tf.tanh(cNew)) as tf.Tensor2D
    if (masks === undefined) {
      h = hNew
      cell = cNew
    } else {
      // m = 1 on real tokens, 0 on padding: state' = state + m·(new - state)
      const m = masks[t]
      h = tf.add(h, tf.mul(m, tf.sub(hNew, h))) as tf.Tensor2D
      cell = tf.add(cell, tf.mul(m, tf.sub(cNew, cell))) as tf.Tensor2D
    }
  }
  const d = tf.relu(linear(h, get(p, "dense.kernel"), get(p, "dense.bias"))) as tf.Tensor2D // [B, F]
  return tf.reshape(linear(d, get(p, "out.kernel"), get(p, "out.bias")), [B]) // [B]
}

export const makeLstmClassifier = (config: Partial<LstmClassifierConfig> = {}): LstmClassifierDef => {
  const c = resolveLstmConfig(config)
  const specs = lstmSpecs(c)
  return {
    kind: "lstm-classifier",
    config: c,
    specs,
    init: (seed) => lstmInit(c, specs, seed),
    loss: (p, batch) => {
      const { x, y, B, L } = batch
      if (x.length !== B * L || y.length !== B) {
        throw new Error(`lstm-classifier batch: x has ${x.length} ids (want B*L = ${B * L}), y has ${y.length} (want ${B})`)
      }
      const logits = lstmLogits(c, p, tf.tensor2d(x, [B, L], "int32")) // [B]
      return sigmoidCrossEntropy(logits, tf.tensor1d(y, "float32"))
    }
  }
}
