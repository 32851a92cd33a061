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
// Batch (model.ts): tokens [B, L] int32 (L = maxLen, 0 = padding, 1 = unknown word: see
// shared/data/tokenizer.ts) and labels [B] float32 in {0, 1}. Blocks: lstm (embedding and
// the LSTM: tokens → final h [B, H]) → dense (ReLU) → out (logits [B]).
// Metrics: loss, accuracy, precision, recall, F1 (class 1 is positive; threshold p = 0.5).
//
// Padding: token id 0 is padding. With `maskPadding` (default, Keras `mask_zero=True`)
// a padded step leaves the LSTM state unchanged, so pre- and post-padding are alike.

import * as tf from "@tensorflow/tfjs"
import { linear, matMul2d, sigmoidCrossEntropy } from "../compute/ops.ts"
import type { Batch, Block, ModelDef, ParamSpec, Params } from "./model.ts"
import { batchOf, sizeOf } from "./model.ts"
import { lstmFinalState } from "./lstm-fast.ts"
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
  /** L: tokens per text (truncated / padded to it). */
  readonly maxLen: number
  /** "fused": lstm-fast.ts' one custom-gradient op (default); "ops": the plain per-step tfjs ops (a reference, and for backends where a per-step read-back costs more than op dispatch). */
  readonly recurrence?: "fused" | "ops"
}

export const lstmClassifierDefaults: LstmClassifierConfig = {
  vocabSize: 10_000, // the seed's IMDB-style word vocabulary
  embedDim: 64,
  hidden: 64,
  dense: 64,
  maskPadding: true,
  maxLen: 100
}

/** Small enough for finite-difference gradient checks. */
export const lstmTiny: LstmClassifierConfig = { vocabSize: 11, embedDim: 4, hidden: 5, dense: 3, maskPadding: true, maxLen: 6 }

/** A classifier batch: tokens [B, L] ids and labels [B] in {0, 1}. */
export const lstmBatch = (tokens: Int32Array, labels: Float32Array): Batch => batchOf(labels.length, { tokens, labels })

export interface LstmClassifierDef extends ModelDef {
  readonly kind: "lstm-classifier"
  readonly config: LstmClassifierConfig
}

export const resolveLstmConfig = (config: Partial<LstmClassifierConfig> = {}): LstmClassifierConfig => {
  const c = { ...lstmClassifierDefaults, ...config }
  for (const k of ["vocabSize", "embedDim", "hidden", "dense", "maxLen"] as const) {
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

const get = (p: Params, name: string): tf.Tensor => {
  const t = p.get(name)
  if (t === undefined) throw new Error(`lstm-classifier: missing parameter "${name}"`)
  return t
}

/**
 * Embedding and LSTM. x: [B, L] int32 ids -> final hidden state h_L [B, H]. The recurrence
 * is lstm-fast.ts' one custom-gradient op (the per-step gate math in plain JS, one matMul a
 * step each way): ~3x faster than the plain-op loop below on wasm, same values to ~1e-6.
 */
export const lstmEncode = (c: LstmClassifierConfig, p: Params, x: tf.Tensor2D): tf.Tensor2D => {
  const [B, L] = x.shape
  const H = c.hidden
  const xs = x.dataSync()
  const ids = new Int32Array(L * B) // time-major [L, B]: the projection below is then [L, B, 4H] with no transpose
  for (let b = 0; b < B; b++) for (let t = 0; t < L; t++) ids[t * B + b] = xs[b * L + t]
  const emb = tf.gather(get(p, "embedding"), tf.tensor1d(ids, "int32")) as tf.Tensor2D // [L*B, E]
  const xz = tf.reshape(linear(emb, get(p, "lstm.kernel"), get(p, "lstm.bias")), [L, B, 4 * H]) as tf.Tensor3D
  const mask = c.maskPadding ? tf.tensor2d(ids.map((v) => (v === 0 ? 0 : 1)), [L, B], "float32") : undefined
  return lstmFinalState(xz, get(p, "lstm.recurrent") as tf.Tensor2D, mask)
}

/** The same as lstmEncode with the recurrence as plain tfjs ops (the reference bench/ and tests compare against). */
export const lstmEncodePlain = (c: LstmClassifierConfig, p: Params, x: tf.Tensor2D): tf.Tensor2D => {
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
  return h
}

/** Dense(F, relu) then Dense(1): h [B, H] -> logits [B]. */
const lstmDense = (p: Params, h: tf.Tensor2D): tf.Tensor2D => tf.relu(linear(h, get(p, "dense.kernel"), get(p, "dense.bias"))) as tf.Tensor2D
const lstmOut = (p: Params, d: tf.Tensor2D): tf.Tensor1D => tf.reshape(linear(d, get(p, "out.kernel"), get(p, "out.bias")), [d.shape[0]])

/** Forward pass. x: [B, L] int32 ids -> logits [B] (sigmoid gives P(y = 1)). */
export const lstmLogits = (c: LstmClassifierConfig, p: Params, x: tf.Tensor2D): tf.Tensor1D => lstmOut(p, lstmDense(p, lstmEncode(c, p, x)))

/** lstmLogits with the plain-op recurrence (lstmEncodePlain). */
export const lstmLogitsPlain = (c: LstmClassifierConfig, p: Params, x: tf.Tensor2D): tf.Tensor1D => lstmOut(p, lstmDense(p, lstmEncodePlain(c, p, x)))

const labelsOf = (batch: Batch): Float32Array => {
  const y = batch.tensors.get("labels")
  if (!(y instanceof Float32Array) || y.length !== batch.size) throw new Error(`lstm-classifier batch: labels must be ${batch.size} float32 values`)
  return y
}

export const lstmBlocks = (c: LstmClassifierConfig): Block[] => [
  {
    name: "lstm",
    params: ["embedding", "lstm.kernel", "lstm.recurrent", "lstm.bias"],
    forward: (p, _x, batch) => {
      const tokens = batch.tensors.get("tokens")
      const B = batch.size
      if (!(tokens instanceof Int32Array) || tokens.length % B !== 0) throw new Error(`lstm-classifier batch: tokens must be int32 [B, L], B = ${B}`)
      return (c.recurrence === "ops" ? lstmEncodePlain : lstmEncode)(c, p, tf.tensor2d(tokens, [B, tokens.length / B], "int32"))
    },
    flops: (L) => 2 * L * 4 * c.hidden * (c.embedDim + c.hidden)
  },
  { name: "dense", params: ["dense.kernel", "dense.bias"], forward: (p, h) => lstmDense(p, h as tf.Tensor2D), flops: () => 2 * c.hidden * c.dense },
  { name: "out", params: ["out.kernel", "out.bias"], forward: (p, d) => lstmOut(p, d as tf.Tensor2D), flops: () => 2 * c.dense }
]

/** Binary metrics from logits and labels: sums (loss·n, n, tp, fp, tn, fn). */
export const binaryScore = (logits: Float32Array | ArrayLike<number>, y: ArrayLike<number>, meanLoss: number): Record<string, number> => {
  let tp = 0
  let fp = 0
  let tn = 0
  let fn = 0
  for (let i = 0; i < y.length; i++) {
    const pred = logits[i] > 0 // sigmoid(z) > 0.5
    const pos = y[i] >= 0.5
    if (pred && pos) tp++
    else if (pred) fp++
    else if (pos) fn++
    else tn++
  }
  return { loss: meanLoss * y.length, n: y.length, tp, fp, tn, fn }
}

export const binarySummary = (s: Readonly<Record<string, number>>): Record<string, number> => {
  const n = s["n"] ?? 0
  const tp = s["tp"] ?? 0
  const fp = s["fp"] ?? 0
  const fn = s["fn"] ?? 0
  const precision = tp + fp > 0 ? tp / (tp + fp) : 0
  const recall = tp + fn > 0 ? tp / (tp + fn) : 0
  return {
    loss: (s["loss"] ?? Number.NaN) / n,
    accuracy: n > 0 ? (tp + (s["tn"] ?? 0)) / n : Number.NaN,
    precision,
    recall,
    f1: precision + recall > 0 ? (2 * precision * recall) / (precision + recall) : 0
  }
}

export const makeLstmClassifier = (config: Partial<LstmClassifierConfig> = {}): LstmClassifierDef => {
  const c = resolveLstmConfig(config)
  const specs = lstmSpecs(c)
  return {
    kind: "lstm-classifier",
    task: "classify",
    config: c,
    specs,
    batch: [
      { name: "tokens", dtype: "int32", shape: ["B", c.maxLen], doc: `word ids per text, truncated/padded to maxLen ${c.maxLen} (0 = padding)`, below: c.vocabSize },
      { name: "labels", dtype: "float32", shape: ["B"], doc: "the class of each text: 0 or 1" }
    ],
    blocks: lstmBlocks(c),
    init: (seed) => lstmInit(c, specs, seed),
    objective: (logits, batch) => sigmoidCrossEntropy(logits as tf.Tensor1D, tf.tensor1d(labelsOf(batch), "float32")),
    score: (logits, batch) => {
      const y = labelsOf(batch)
      const loss = sigmoidCrossEntropy(logits as tf.Tensor1D, tf.tensor1d(y, "float32")).dataSync()[0]
      return binaryScore(logits.dataSync() as Float32Array, y, loss)
    },
    summarize: binarySummary,
    metrics: [
      { key: "loss", label: "val", better: "lower" },
      { key: "accuracy", label: "acc", better: "higher" },
      { key: "precision", label: "prec", better: "higher" },
      { key: "recall", label: "rec", better: "higher" },
      { key: "f1", label: "f1", better: "higher" }
    ],
    units: (batch) => ({ n: batch.size, unit: "samples" })
  }
}
