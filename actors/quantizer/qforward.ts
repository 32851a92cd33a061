/**
 * Implements: the forward passes of a quantized model (qmodel.ts) — the GPT and the LSTM
 * classifier — with each weight dequantized from int8/int4 into a transient tensor right
 * before its use, and each int8 matmul's input rounded to the int8 grid (fake
 * quantization: numerically what an int8 × int8 kernel with a float32 rescale computes, up
 * to the order of accumulation). Also scoring a batch with the model's own metrics, the
 * logits for `flotilla classify`, and sampling text for `flotilla generate`.
 * Does not own: the float models (shared/models/gpt.ts, lstm-classifier.ts: these passes
 * are theirs op for op, test/ptq.test.ts holds them equal within 1e-5 with nothing
 * quantized), quantizing tensors (qmodel.ts), files (qfile.ts).
 *
 * Why a forward of its own: the models' code reads float tensors and has no hook on a
 * matmul's input, so the activation quantizer cannot be put between them from outside.
 * What is quantized (int8 modes): the inputs of every linear layer (the GPT's c_attn,
 * attn c_proj, c_fc, mlp c_proj and the tied head; the LSTM's input kernel, its recurrent
 * kernel at every step, and the dense layer). Float: embedding lookups (their rows are
 * dequantized), LayerNorm, GELU/sigmoid/tanh, softmax, the attention products q·kᵀ and
 * att·v (activation × activation), residual adds, biases, the classifier's 64-wide output.
 *
 * Shapes: B batch, T sequence length, C width, H heads, D = C / H, V vocab (GPT);
 * L steps, E embedding width, Hc LSTM units (classifier).
 */
import * as tf from "@tensorflow/tfjs"
import { batchMatMul, gelu, layerNorm, linear, matMul2d } from "../../shared/compute/ops.ts"
import { causalMask, gptInputsTargets, sampleLogits, type GenerateOptions, type GptConfig } from "../../shared/models/gpt.ts"
import type { LstmClassifierConfig } from "../../shared/models/lstm-classifier.ts"
import { checkBatch, type Batch } from "../../shared/models/model.ts"
import { Rng } from "../../shared/models/rng.ts"
import { activationsFor, isInt8, quantizeActivation, weight, weightRows, type Activations, type QModel } from "./qmodel.ts"

/** x [N, in] @ W + b for the linear layer whose weight is `w`; its input quantized when W is int8. */
const dense = (qm: QModel, act: Activations, w: string, b: string, x: tf.Tensor2D): tf.Tensor2D => {
  const xin = isInt8(qm, w) ? (quantizeActivation(act, w, x) as tf.Tensor2D) : x
  return linear(xin, weight(qm, w), weight(qm, b))
}

/** GPT forward. x: [B, T] token ids (row-major) → logits [B*T, V]. Call inside a tidy. */
export const qGptLogits = (qm: QModel, act: Activations, x: Int32Array, B: number, T: number): tf.Tensor2D => {
  const c = qm.def.config as GptConfig
  const C = c.width
  const H = c.heads
  const D = C / H
  if (T > c.contextLength) throw new Error(`gpt: sequence length ${T} exceeds contextLength ${c.contextLength}`)
  const tok = tf.reshape(weightRows(qm, "wte", x), [B, T, C]) // [B, T, C]
  const pos = weightRows(qm, "wpe", Int32Array.from({ length: T }, (_, t) => t)) // [T, C]
  let h = tf.reshape(tf.add(tok, pos), [B * T, C]) as tf.Tensor2D // [B*T, C]
  const heads = (t: tf.Tensor): tf.Tensor3D => tf.reshape(tf.transpose(tf.reshape(t, [B, T, H, D]), [0, 2, 1, 3]), [B * H, T, D])
  for (let l = 0; l < c.layers; l++) {
    const p = `h.${l}.`
    const a = layerNorm(h, weight(qm, p + "ln_1.weight"), weight(qm, p + "ln_1.bias"))
    const qkv = dense(qm, act, p + "attn.c_attn.weight", p + "attn.c_attn.bias", a) // [B*T, 3C]
    const [q, k, v] = tf.split(qkv, 3, 1) // each [B*T, C]
    const qs = tf.mul(heads(q), 1 / Math.sqrt(D)) as tf.Tensor3D // [B*H, T, D]
    const kT = tf.transpose(heads(k), [0, 2, 1]) as tf.Tensor3D // [B*H, D, T]
    const att = tf.add(batchMatMul(qs, kT), causalMask(T)) // [B*H, T, T]
    const y = batchMatMul(tf.softmax(att) as tf.Tensor3D, heads(v)) // [B*H, T, D]
    const merged = tf.reshape(tf.transpose(tf.reshape(y, [B, H, T, D]), [0, 2, 1, 3]), [B * T, C]) as tf.Tensor2D
    h = tf.add(h, dense(qm, act, p + "attn.c_proj.weight", p + "attn.c_proj.bias", merged))
    const m = layerNorm(h, weight(qm, p + "ln_2.weight"), weight(qm, p + "ln_2.bias"))
    const f = gelu(dense(qm, act, p + "mlp.c_fc.weight", p + "mlp.c_fc.bias", m)) // [B*T, 4C]
    h = tf.add(h, dense(qm, act, p + "mlp.c_proj.weight", p + "mlp.c_proj.bias", f))
  }
  const n = layerNorm(h, weight(qm, "ln_f.weight"), weight(qm, "ln_f.bias")) as tf.Tensor2D // [B*T, C]
  const nin = isInt8(qm, "wte") ? (quantizeActivation(act, "wte", n) as tf.Tensor2D) : n
  return matMul2d(nin, tf.transpose(weight(qm, "wte")) as tf.Tensor2D) // [B*T, V]: the head tied to wte
}

/** LSTM classifier forward. tokens: [B, L] ids (row-major) → logits [B]. Call inside a tidy. */
export const qLstmLogits = (qm: QModel, act: Activations, tokens: Int32Array, B: number): tf.Tensor1D => {
  const c = qm.def.config as LstmClassifierConfig
  const L = tokens.length / B
  const Hc = c.hidden
  const ids = new Int32Array(L * B) // time-major [L, B]
  for (let b = 0; b < B; b++) for (let t = 0; t < L; t++) ids[t * B + b] = tokens[b * L + t]
  const emb = weightRows(qm, "embedding", ids) // [L*B, E]
  const xz = tf.reshape(dense(qm, act, "lstm.kernel", "lstm.bias", emb), [L, B, 4 * Hc]) // [L, B, 4Hc]
  const steps = tf.unstack(xz) as tf.Tensor2D[] // L × [B, 4Hc]
  const U = weight(qm, "lstm.recurrent") as tf.Tensor2D // [Hc, 4Hc], dequantized once per call
  const uInt8 = isInt8(qm, "lstm.recurrent")
  let h = tf.zeros([B, Hc]) as tf.Tensor2D
  let cell = tf.zeros([B, Hc]) as tf.Tensor2D
  for (let t = 0; t < L; t++) {
    const row = ids.subarray(t * B, (t + 1) * B)
    // a step where every row is padding leaves the masked state unchanged (lstm-fast.ts skips it too)
    if (c.maskPadding && row.every((v) => v === 0)) continue
    const hin = uInt8 ? (quantizeActivation(act, "lstm.recurrent", h) as tf.Tensor2D) : h
    const z = tf.add(steps[t], matMul2d(hin, U)) // [B, 4Hc]
    const [zi, zf, zg, zo] = tf.split(z, 4, 1) // each [B, Hc]
    const cNew = tf.add(tf.mul(tf.sigmoid(zf), cell), tf.mul(tf.sigmoid(zi), tf.tanh(zg))) as tf.Tensor2D
    const hNew = tf.mul(tf.sigmoid(zo), tf.tanh(cNew)) as tf.Tensor2D
    if (!c.maskPadding) {
      h = hNew
      cell = cNew
    } else {
      const m = tf.tensor2d(Float32Array.from(row, (v) => (v === 0 ? 0 : 1)), [B, 1]) // 1 on real tokens
      h = tf.add(h, tf.mul(m, tf.sub(hNew, h))) as tf.Tensor2D
      cell = tf.add(cell, tf.mul(m, tf.sub(cNew, cell))) as tf.Tensor2D
    }
  }
  const d = tf.relu(dense(qm, act, "dense.kernel", "dense.bias", h)) as tf.Tensor2D // [B, F]
  return tf.reshape(dense(qm, act, "out.kernel", "out.bias", d), [B]) // [B]
}

/** The model's output for a batch (GPT logits [B*T, V]; classifier logits [B]). Call inside a tidy. */
export const qForward = (qm: QModel, act: Activations, batch: Batch): tf.Tensor => {
  checkBatch(qm.def, batch)
  if (qm.def.kind === "gpt") {
    const { x, B, T } = gptInputsTargets(batch)
    return qGptLogits(qm, act, x, B, T)
  }
  if (qm.def.kind === "lstm-classifier") return qLstmLogits(qm, act, batch.tensors.get("tokens") as Int32Array, batch.size)
  throw new Error(`quantized forward: model kind ${qm.def.kind} is not supported`)
}

/** Metric sums of one batch (the model's own `score`; add them, then `def.summarize`). Leaves no tensor behind. */
export const qScore = (qm: QModel, batch: Batch, act: Activations = activationsFor(qm)): Record<string, number> =>
  tf.tidy(() => qm.def.score(qForward(qm, act, batch), batch))

/** Classifier logits [B] as plain numbers (sigmoid gives P(class 1)). */
export const qClassifierLogits = (qm: QModel, batch: Batch): Float32Array =>
  Float32Array.from(tf.tidy(() => qForward(qm, activationsFor(qm), batch).dataSync()))

/**
 * Sample `n` tokens after `prompt` from a quantized GPT (gpt.ts `generate`, with this
 * file's forward): the context is cropped to contextLength; one forward per token, its
 * weights dequantized layer by layer.
 */
export const qGenerate = (qm: QModel, prompt: Int32Array, n: number, options: GenerateOptions): Int32Array => {
  if (qm.def.kind !== "gpt") throw new Error(`generate: the model is ${qm.def.kind}, not a gpt`)
  const c = qm.def.config as GptConfig
  const act = activationsFor(qm)
  const rng = new Rng(options.seed)
  const seq = Array.from(prompt.length > 0 ? prompt : [0])
  const out = new Int32Array(n)
  for (let i = 0; i < n; i++) {
    const ctx = Int32Array.from(seq.slice(-c.contextLength))
    const T = ctx.length
    const last = tf.tidy(() => tf.slice(qGptLogits(qm, act, ctx, 1, T), [T - 1, 0], [1, c.vocabSize]).dataSync()) // [V]
    out[i] = sampleLogits(last, options, rng)
    seq.push(out[i])
  }
  return out
}
