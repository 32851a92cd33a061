// Implements: a GPT-style decoder language model (nanoGPT's model.py, in TensorFlow.js
// ops over named parameters): token + position embeddings, pre-LayerNorm blocks of
// causal multi-head self-attention and a 4x GELU MLP, final LayerNorm, and a head tied
// to the token embedding. Also sampling text from it (`generate`).
// Owns: the GPT maths, its config defaults, param names/shapes and init. Does not own:
// tensor bookkeeping around a loss (model.ts), training, or data.
//
// Shapes, used in every comment below:
//   B batch size, T sequence length (<= contextLength), C width, V vocab size,
//   H heads, D = C / H head size.
//
// Batch: `tokens` holds B windows of T+1 consecutive tokens, row-major (length
// B*(T+1)); inputs are each window's first T tokens and targets its last T. One window
// per row means the loader cuts a corpus once and ships no duplicated tokens.

import * as tf from "@tensorflow/tfjs"
import { batchMatMul, gelu, layerNorm, linear, matMul2d, softmaxCrossEntropy } from "../compute/ops.ts"
import type { ModelDef, ParamSpec } from "./model.ts"
import { sizeOf } from "./model.ts"
import { Rng } from "./rng.ts"

export interface GptConfig {
  /** V: 256 = raw bytes. */
  readonly vocabSize: number
  /** Longest T the position embedding covers. */
  readonly contextLength: number
  /** Number of transformer blocks. */
  readonly layers: number
  /** H: attention heads; must divide width. */
  readonly heads: number
  /** C: residual stream width; the MLP is 4*C wide. */
  readonly width: number
  /** Accepted for config compatibility and ignored: Flotilla's GPT has no dropout. */
  readonly dropout: number
}

export const gptDefaults: GptConfig = {
  vocabSize: 256, // bytes: no tokenizer to ship
  contextLength: 128,
  layers: 4,
  heads: 4,
  width: 128,
  dropout: 0 // ignored
}

/** The PERF-NOTES reference model (batch 32 in the benchmarks). */
export const gptMini: GptConfig = { ...gptDefaults }

/** Small enough for finite-difference gradient checks. */
export const gptTiny: GptConfig = { vocabSize: 13, contextLength: 8, layers: 2, heads: 2, width: 8, dropout: 0 }

export interface GptBatch {
  /** B rows of T+1 token ids each, row-major: length B*(T+1). */
  readonly tokens: Int32Array
  /** B */
  readonly batchSize: number
  /** T (the number of predicted positions per row) */
  readonly seqLen: number
}

export interface GptDef extends ModelDef<GptBatch> {
  readonly kind: "gpt"
  readonly config: GptConfig
}

export const resolveGptConfig = (config: Partial<GptConfig> = {}): GptConfig => {
  const c = { ...gptDefaults, ...config }
  for (const k of ["vocabSize", "contextLength", "layers", "heads", "width"] as const) {
    if (!Number.isInteger(c[k]) || c[k] < 1) throw new Error(`gpt: ${k} must be a positive integer, got ${c[k]}`)
  }
  if (c.width % c.heads !== 0) throw new Error(`gpt: width ${c.width} is not divisible by heads ${c.heads}`)
  return c
}

/** Parameter names follow nanoGPT/GPT-2 (`h.0.attn.c_attn.weight`, ...); linear weights
 *  are stored [in, out] so that y = x @ W. */
export const gptSpecs = (c: GptConfig): ParamSpec[] => {
  const C = c.width
  const specs: ParamSpec[] = [
    { name: "wte", shape: [c.vocabSize, C] }, // [V,C], also the output head (tied)
    { name: "wpe", shape: [c.contextLength, C] } // [T_max,C]
  ]
  for (let l = 0; l < c.layers; l++) {
    const p = `h.${l}.`
    specs.push(
      { name: p + "ln_1.weight", shape: [C] },
      { name: p + "ln_1.bias", shape: [C] },
      { name: p + "attn.c_attn.weight", shape: [C, 3 * C] }, // q, k, v side by side
      { name: p + "attn.c_attn.bias", shape: [3 * C] },
      { name: p + "attn.c_proj.weight", shape: [C, C] },
      { name: p + "attn.c_proj.bias", shape: [C] },
      { name: p + "ln_2.weight", shape: [C] },
      { name: p + "ln_2.bias", shape: [C] },
      { name: p + "mlp.c_fc.weight", shape: [C, 4 * C] },
      { name: p + "mlp.c_fc.bias", shape: [4 * C] },
      { name: p + "mlp.c_proj.weight", shape: [4 * C, C] },
      { name: p + "mlp.c_proj.bias", shape: [C] }
    )
  }
  specs.push({ name: "ln_f.weight", shape: [C] }, { name: "ln_f.bias", shape: [C] })
  return specs
}

/** GPT-2 init: weights and embeddings N(0, 0.02), residual projections (c_proj)
 *  N(0, 0.02/sqrt(2·layers)), biases 0, LayerNorm gains 1. One RNG stream in spec order. */
export const gptInit = (c: GptConfig, specs: readonly ParamSpec[], seed: number): Map<string, Float32Array> => {
  const rng = new Rng(seed)
  const out = new Map<string, Float32Array>()
  for (const s of specs) {
    const v = new Float32Array(sizeOf(s.shape))
    if (/ln_\w+\.weight$/.test(s.name)) v.fill(1)
    else if (s.name.endsWith(".bias")) v.fill(0)
    else if (s.name.endsWith("c_proj.weight")) rng.fillNormal(v, 0.02 / Math.sqrt(2 * c.layers))
    else rng.fillNormal(v, 0.02)
    out.set(s.name, v)
  }
  return out
}

/** Additive causal mask [T,T]: 0 where key j <= query i, -1e9 above the diagonal. */
const causalMasks = new Map<number, Float32Array>()
const causalMask = (T: number): tf.Tensor2D => {
  let m = causalMasks.get(T)
  if (m === undefined) {
    m = new Float32Array(T * T)
    for (let i = 0; i < T; i++) for (let j = i + 1; j < T; j++) m[i * T + j] = -1e9
    causalMasks.set(T, m)
  }
  return tf.tensor2d(m, [T, T])
}

type Params = ReadonlyMap<string, tf.Tensor>
const get = (p: Params, name: string): tf.Tensor => {
  const t = p.get(name)
  if (t === undefined) throw new Error(`gpt: missing parameter "${name}"`)
  return t
}

/** Causal multi-head self-attention. x: [B*T, C] -> [B*T, C]. */
const attention = (c: GptConfig, p: Params, pre: string, x: tf.Tensor2D, B: number, T: number): tf.Tensor2D => {
  const C = c.width
  const H = c.heads
  const D = C / H
  const qkv = linear(x, get(p, pre + "c_attn.weight"), get(p, pre + "c_attn.bias")) // [B*T, 3C]
  const [q, k, v] = tf.split(qkv, 3, 1) // each [B*T, C]
  // [B*T, C] -> [B, T, H, D] -> [B, H, T, D] -> [B*H, T, D]
  const heads = (t: tf.Tensor): tf.Tensor3D =>
    tf.reshape(tf.transpose(tf.reshape(t, [B, T, H, D]), [0, 2, 1, 3]), [B * H, T, D])
  const qs = tf.mul(heads(q), 1 / Math.sqrt(D)) // [B*H, T, D]: scaling q is T/D times cheaper than scaling att
  const kT = tf.transpose(heads(k), [0, 2, 1]) // [B*H, D, T]: explicit, so the product below is plain
  const att = tf.add(batchMatMul(qs as tf.Tensor3D, kT), causalMask(T)) // [B*H, T, T]
  const y = batchMatMul(tf.softmax(att) as tf.Tensor3D, heads(v)) // [B*H, T, D]
  const merged = tf.reshape(tf.transpose(tf.reshape(y, [B, H, T, D]), [0, 2, 1, 3]), [B * T, C]) as tf.Tensor2D // [B*T, C]
  return linear(merged, get(p, pre + "c_proj.weight"), get(p, pre + "c_proj.bias"))
}

/** MLP: x: [B*T, C] -> [B*T, 4C] -> GELU -> [B*T, C]. */
const mlp = (p: Params, pre: string, x: tf.Tensor2D): tf.Tensor2D => {
  const h = gelu(linear(x, get(p, pre + "c_fc.weight"), get(p, pre + "c_fc.bias"))) // [B*T, 4C]
  return linear(h, get(p, pre + "c_proj.weight"), get(p, pre + "c_proj.bias"))
}

/** Forward pass. idx: [B, T] int32 token ids -> logits [B*T, V] (row b*T + t). */
export const gptLogits = (c: GptConfig, p: Params, idx: tf.Tensor2D): tf.Tensor2D => {
  const [B, T] = idx.shape
  const C = c.width
  if (T > c.contextLength) throw new Error(`gpt: sequence length ${T} exceeds contextLength ${c.contextLength}`)
  const wte = get(p, "wte") as tf.Tensor2D // [V, C]
  const tok = tf.reshape(tf.gather(wte, tf.reshape(idx, [B * T])), [B, T, C]) // [B, T, C]
  const pos = tf.slice(get(p, "wpe"), [0, 0], [T, C]) // [T, C]
  let x = tf.reshape(tf.add(tok, pos), [B * T, C]) as tf.Tensor2D // [B*T, C] residual stream
  for (let l = 0; l < c.layers; l++) {
    const pre = `h.${l}.`
    const a = layerNorm(x, get(p, pre + "ln_1.weight"), get(p, pre + "ln_1.bias"))
    x = tf.add<tf.Tensor2D>(x, attention(c, p, pre + "attn.", a, B, T))
    const m = layerNorm(x, get(p, pre + "ln_2.weight"), get(p, pre + "ln_2.bias"))
    x = tf.add<tf.Tensor2D>(x, mlp(p, pre + "mlp.", m))
  }
  x = layerNorm(x, get(p, "ln_f.weight"), get(p, "ln_f.bias"))
  return matMul2d(x, tf.transpose(wte) as tf.Tensor2D) // [B*T, C] @ [C, V] -> [B*T, V], head tied to wte
}

/** Split a batch into inputs [B, T] and targets [B*T] (int32). */
export const gptInputsTargets = (batch: GptBatch): { x: Int32Array; y: Int32Array } => {
  const { tokens, batchSize: B, seqLen: T } = batch
  if (tokens.length !== B * (T + 1)) {
    throw new Error(`gpt batch: tokens has ${tokens.length} ids, expected B*(T+1) = ${B}*${T + 1}`)
  }
  const x = new Int32Array(B * T)
  const y = new Int32Array(B * T)
  for (let b = 0; b < B; b++) {
    x.set(tokens.subarray(b * (T + 1), b * (T + 1) + T), b * T)
    y.set(tokens.subarray(b * (T + 1) + 1, (b + 1) * (T + 1)), b * T)
  }
  return { x, y }
}

export const makeGpt = (config: Partial<GptConfig> = {}): GptDef => {
  const c = resolveGptConfig(config)
  const specs = gptSpecs(c)
  return {
    kind: "gpt",
    config: c,
    specs,
    init: (seed) => gptInit(c, specs, seed),
    loss: (p, batch) => {
      // Mean next-token cross-entropy over B*T positions.
      const { x, y } = gptInputsTargets(batch)
      const logits = gptLogits(c, p, tf.tensor2d(x, [batch.batchSize, batch.seqLen], "int32")) // [B*T, V]
      return softmaxCrossEntropy(logits, tf.tensor1d(y, "int32"))
    }
  }
}

export interface GenerateOptions {
  /** Softmax temperature; 0 = greedy (argmax). */
  readonly temperature: number
  /** Sample only among the k most likely tokens. */
  readonly topK?: number
  readonly seed: number
}

/**
 * Autoregressive sampling: extend `prompt` by `n` tokens (returns only the new ones).
 * The context is cropped to the last contextLength tokens. One forward per token
 * (no KV cache: fine for the short samples printed at the end of training).
 */
export const generate = (
  def: GptDef,
  params: ReadonlyMap<string, Float32Array>,
  prompt: Int32Array,
  n: number,
  options: GenerateOptions
): Int32Array => {
  const c = def.config
  const V = c.vocabSize
  const rng = new Rng(options.seed)
  const seq = Array.from(prompt.length > 0 ? prompt : [0])
  const out = new Int32Array(n)
  const tensors = new Map<string, tf.Tensor>()
  try {
    for (const s of def.specs) tensors.set(s.name, tf.tensor(params.get(s.name)!, [...s.shape], "float32"))
    for (let i = 0; i < n; i++) {
      const ctx = seq.slice(-c.contextLength)
      const T = ctx.length
      const last = tf.tidy(() => {
        const logits = gptLogits(c, tensors, tf.tensor2d(ctx, [1, T], "int32")) // [T, V]
        return tf.slice(logits, [T - 1, 0], [1, V]).dataSync() // [V]
      })
      const next = sampleLogits(last, options, rng)
      out[i] = next
      seq.push(next)
    }
  } finally {
    for (const t of tensors.values()) t.dispose()
  }
  return out
}

/** Pick a token from logits [V] on the CPU (temperature, top-k, seeded). */
export const sampleLogits = (
  logits: ArrayLike<number>,
  options: Pick<GenerateOptions, "temperature" | "topK">,
  rng: Rng
): number => {
  const V = logits.length
  let order = Array.from({ length: V }, (_, i) => i)
  if (options.temperature <= 0) return order.reduce((best, i) => (logits[i] > logits[best] ? i : best), 0)
  if (options.topK !== undefined && options.topK > 0 && options.topK < V) {
    order = order.sort((a, b) => logits[b] - logits[a]).slice(0, options.topK)
  }
  const max = Math.max(...order.map((i) => logits[i]))
  const w = order.map((i) => Math.exp((logits[i] - max) / options.temperature))
  let r = rng.uniform() * w.reduce((a, b) => a + b, 0)
  for (let j = 0; j < order.length; j++) {
    r -= w[j]
    if (r <= 0) return order[j]
  }
  return order[order.length - 1]
}
