// Implements: a GPT-style decoder language model (nanoGPT's model.py, in TensorFlow.js
// ops over named parameters): token + position embeddings, pre-LayerNorm blocks of
// causal multi-head self-attention and a 4x GELU MLP, final LayerNorm, and a head tied
// to the token embedding. Also sampling text from it (`generate`).
// Also optional LoRA adapters (Hu et al. 2021) on its linear layers: a targeted layer L
// computes x@W + b + (alpha/r)·((x@A)@B) with L.lora_A [in, r] and L.lora_B [r, out].
// Owns: the GPT maths, its config defaults, param names/shapes and init (adapters
// included). Does not own: tensor bookkeeping around a loss (model.ts), training, data,
// or what to do with adapters afterwards (lora.ts: merging, which tensors train).
//
// Shapes, used in every comment below:
//   B batch size, T sequence length (<= contextLength), C width, V vocab size,
//   H heads, D = C / H head size.
//
// Batch: `tokens` [B, T+1] int32 holds B windows of T+1 consecutive tokens, row-major;
// inputs are each window's first T tokens and targets its last T. One window per row
// means the loader cuts a corpus once and ships no duplicated tokens.
// Blocks (model.ts): embed (wte, wpe) → h.0 … h.{layers-1} → head (ln_f, and wte again:
// the head is tied to the token embedding, so a cut that separates embed from head
// shares wte between those stages). Adapters belong to their h.N block.

import * as tf from "@tensorflow/tfjs"
import { batchMatMul, gelu, layerNorm, linear, matMul2d, softmaxCrossEntropy } from "../compute/ops.ts"
import type { Batch, Block, ModelDef, ParamSpec, Params } from "./model.ts"
import { batchOf, sizeOf } from "./model.ts"
import { matchesAny, unmatched } from "./patterns.ts"
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
  /** LoRA adapters on the linear layers `targets` matches (none when absent). */
  readonly lora?: GptLora
}

export interface GptLora {
  /** r: the adapters' inner width (>= 1). */
  readonly rank: number
  /** The update is scaled by alpha / r (> 0). */
  readonly alpha: number
  /** Patterns (patterns.ts) over linear layer names without `.weight`: `h.*.attn.c_attn`, `h.*.mlp`. */
  readonly targets: readonly string[]
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

/** A GPT batch: tokens [B, T+1] (T ≤ contextLength). */
export const gptBatch = (tokens: Int32Array, B: number): Batch => batchOf(B, { tokens })

export interface GptDef extends ModelDef {
  readonly kind: "gpt"
  readonly config: GptConfig
}

export const resolveGptConfig = (config: Partial<GptConfig> = {}): GptConfig => {
  const c = { ...gptDefaults, ...config }
  for (const k of ["vocabSize", "contextLength", "layers", "heads", "width"] as const) {
    if (!Number.isInteger(c[k]) || c[k] < 1) throw new Error(`gpt: ${k} must be a positive integer, got ${c[k]}`)
  }
  if (c.width % c.heads !== 0) throw new Error(`gpt: width ${c.width} is not divisible by heads ${c.heads}`)
  if (c.lora === undefined) {
    const { lora: _, ...base } = c // an explicit `lora: undefined` is no LoRA
    return base
  }
  const { rank, alpha, targets } = c.lora
  if (!Number.isInteger(rank) || rank < 1) throw new Error(`gpt: lora.rank must be a positive integer, got ${rank}`)
  if (!Number.isFinite(alpha) || alpha <= 0) throw new Error(`gpt: lora.alpha must be a positive number, got ${alpha}`)
  if (!Array.isArray(targets) || targets.length === 0) throw new Error("gpt: lora.targets must list at least one linear layer pattern")
  const names = gptLinears(c).map((l) => l.name)
  const bad = unmatched(names, targets)
  if (bad.length > 0) {
    throw new Error(
      `gpt: lora.targets ${bad.map((t) => JSON.stringify(t)).join(", ")} match${bad.length === 1 ? "es" : ""} no linear layer ` +
        `(they are ${names.slice(0, 4).join(", ")}, ... for each block h.N; name layers without ".weight")`
    )
  }
  return c
}

/** A linear layer: `name` without `.weight`/`.bias`; weight [inDim, outDim]. */
export interface GptLinear {
  readonly name: string
  readonly inDim: number
  readonly outDim: number
}

/** Every linear layer, in block order (c_attn, attn c_proj, c_fc, mlp c_proj per block). */
export const gptLinears = (c: GptConfig): GptLinear[] => {
  const C = c.width
  return Array.from({ length: c.layers }, (_, l) => [
    { name: `h.${l}.attn.c_attn`, inDim: C, outDim: 3 * C },
    { name: `h.${l}.attn.c_proj`, inDim: C, outDim: C },
    { name: `h.${l}.mlp.c_fc`, inDim: C, outDim: 4 * C },
    { name: `h.${l}.mlp.c_proj`, inDim: 4 * C, outDim: C }
  ]).flat()
}

/** The linear layers LoRA adapts (none without `lora`), in gptLinears order. */
export const gptLoraLayers = (c: GptConfig): GptLinear[] =>
  c.lora === undefined ? [] : gptLinears(c).filter((l) => matchesAny(l.name, c.lora!.targets))

/** Adapter specs, after the base specs: for each adapted layer L, L.lora_A [in, r] then L.lora_B [r, out]. */
const loraSpecs = (c: GptConfig): ParamSpec[] =>
  gptLoraLayers(c).flatMap((l) => [
    { name: `${l.name}.lora_A`, shape: [l.inDim, c.lora!.rank] },
    { name: `${l.name}.lora_B`, shape: [c.lora!.rank, l.outDim] }
  ])

/** Parameter names follow nanoGPT/GPT-2 (`h.0.attn.c_attn.weight`, ...); linear weights
 *  are stored [in, out] so that y = x @ W. LoRA adapters come after every base spec, so
 *  the base order (and a checkpoint without adapters) is the same with or without them. */
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
  return [...specs, ...loraSpecs(c)]
}

/** Seed offset of the adapters' own stream (so the base stream is the one without LoRA). */
const LORA_SEED = 0x10a4

/** GPT-2 init: weights and embeddings N(0, 0.02), residual projections (c_proj)
 *  N(0, 0.02/sqrt(2·layers)), biases 0, LayerNorm gains 1. One RNG stream in spec order.
 *  LoRA (Hu et al.): lora_A ~ N(0, 1/r) (std 1/sqrt(r)) from a second stream seeded
 *  seed + LORA_SEED, lora_B = 0, so step 0 is exactly the base model and the base values
 *  are those of the same seed without adapters. */
export const gptInit = (c: GptConfig, specs: readonly ParamSpec[], seed: number): Map<string, Float32Array> => {
  const rng = new Rng(seed)
  const loraRng = new Rng(seed + LORA_SEED)
  const out = new Map<string, Float32Array>()
  for (const s of specs) {
    const v = new Float32Array(sizeOf(s.shape))
    if (s.name.endsWith(".lora_A")) loraRng.fillNormal(v, 1 / Math.sqrt(s.shape[1]))
    else if (s.name.endsWith(".lora_B")) v.fill(0)
    else if (/ln_\w+\.weight$/.test(s.name)) v.fill(1)
    else if (s.name.endsWith(".bias")) v.fill(0)
    else if (s.name.endsWith("c_proj.weight")) rng.fillNormal(v, 0.02 / Math.sqrt(2 * c.layers))
    else rng.fillNormal(v, 0.02)
    out.set(s.name, v)
  }
  return out
}

/** Additive causal mask [T,T]: 0 where key j <= query i, -1e9 above the diagonal. */
const causalMasks = new Map<number, Float32Array>()
export const causalMask = (T: number): tf.Tensor2D => {
  let m = causalMasks.get(T)
  if (m === undefined) {
    m = new Float32Array(T * T)
    for (let i = 0; i < T; i++) for (let j = i + 1; j < T; j++) m[i * T + j] = -1e9
    causalMasks.set(T, m)
  }
  return tf.tensor2d(m, [T, T])
}

const get = (p: Params, name: string): tf.Tensor => {
  const t = p.get(name)
  if (t === undefined) throw new Error(`gpt: missing parameter "${name}"`)
  return t
}

/** Adapted layer names per config object (the forward asks once per layer per call). */
const adaptedCache = new WeakMap<GptConfig, ReadonlySet<string>>()
const adapted = (c: GptConfig): ReadonlySet<string> => {
  let s = adaptedCache.get(c)
  if (s === undefined) adaptedCache.set(c, (s = new Set(gptLoraLayers(c).map((l) => l.name))))
  return s
}

/** Linear layer `name`: x [N, in] -> [N, out]; x@W + b, plus (alpha/r)·((x@A)@B) when LoRA adapts it.
 *  The scale goes on x@A [N, r], the narrowest product. */
const dense = (c: GptConfig, p: Params, name: string, x: tf.Tensor2D): tf.Tensor2D => {
  const y = linear(x, get(p, name + ".weight"), get(p, name + ".bias")) // [N, out]
  if (c.lora === undefined || !adapted(c).has(name)) return y
  const xa = tf.mul(matMul2d(x, get(p, name + ".lora_A") as tf.Tensor2D), c.lora.alpha / c.lora.rank) as tf.Tensor2D // [N, r]
  return tf.add(y, matMul2d(xa, get(p, name + ".lora_B") as tf.Tensor2D)) // [N, out]
}

/** Causal multi-head self-attention. x: [B*T, C] -> [B*T, C]. */
const attention = (c: GptConfig, p: Params, pre: string, x: tf.Tensor2D, B: number, T: number): tf.Tensor2D => {
  const C = c.width
  const H = c.heads
  const D = C / H
  const qkv = dense(c, p, pre + "c_attn", x) // [B*T, 3C]
  const [q, k, v] = tf.split(qkv, 3, 1) // each [B*T, C]
  // [B*T, C] -> [B, T, H, D] -> [B, H, T, D] -> [B*H, T, D]
  const heads = (t: tf.Tensor): tf.Tensor3D =>
    tf.reshape(tf.transpose(tf.reshape(t, [B, T, H, D]), [0, 2, 1, 3]), [B * H, T, D])
  const qs = tf.mul(heads(q), 1 / Math.sqrt(D)) // [B*H, T, D]: scaling q is T/D times cheaper than scaling att
  const kT = tf.transpose(heads(k), [0, 2, 1]) // [B*H, D, T]: explicit, so the product below is plain
  const att = tf.add(batchMatMul(qs as tf.Tensor3D, kT), causalMask(T)) // [B*H, T, T]
  const y = batchMatMul(tf.softmax(att) as tf.Tensor3D, heads(v)) // [B*H, T, D]
  const merged = tf.reshape(tf.transpose(tf.reshape(y, [B, H, T, D]), [0, 2, 1, 3]), [B * T, C]) as tf.Tensor2D // [B*T, C]
  return dense(c, p, pre + "c_proj", merged)
}

/** MLP: x: [B*T, C] -> [B*T, 4C] -> GELU -> [B*T, C]. */
const mlp = (c: GptConfig, p: Params, pre: string, x: tf.Tensor2D): tf.Tensor2D => {
  const h = gelu(dense(c, p, pre + "c_fc", x)) // [B*T, 4C]
  return dense(c, p, pre + "c_proj", h)
}

/** Token + position embeddings. idx: [B, T] -> residual stream [B*T, C]. */
const embed = (c: GptConfig, p: Params, idx: tf.Tensor2D): tf.Tensor2D => {
  const [B, T] = idx.shape
  const C = c.width
  if (T > c.contextLength) throw new Error(`gpt: sequence length ${T} exceeds contextLength ${c.contextLength}`)
  const tok = tf.reshape(tf.gather(get(p, "wte"), tf.reshape(idx, [B * T])), [B, T, C]) // [B, T, C]
  const pos = tf.slice(get(p, "wpe"), [0, 0], [T, C]) // [T, C]
  return tf.reshape(tf.add(tok, pos), [B * T, C]) as tf.Tensor2D // [B*T, C]
}

/** Transformer block l on the residual stream x: [B*T, C] -> [B*T, C]. */
const block = (c: GptConfig, p: Params, l: number, x: tf.Tensor2D, B: number, T: number): tf.Tensor2D => {
  const pre = `h.${l}.`
  const a = layerNorm(x, get(p, pre + "ln_1.weight"), get(p, pre + "ln_1.bias"))
  const y = tf.add<tf.Tensor2D>(x, attention(c, p, pre + "attn.", a, B, T))
  const m = layerNorm(y, get(p, pre + "ln_2.weight"), get(p, pre + "ln_2.bias"))
  return tf.add<tf.Tensor2D>(y, mlp(c, p, pre + "mlp.", m))
}

/** Final LayerNorm and the head tied to wte: [B*T, C] -> logits [B*T, V]. */
const head = (p: Params, x: tf.Tensor2D): tf.Tensor2D =>
  matMul2d(layerNorm(x, get(p, "ln_f.weight"), get(p, "ln_f.bias")), tf.transpose(get(p, "wte")) as tf.Tensor2D)

/** Forward pass. idx: [B, T] int32 token ids -> logits [B*T, V] (row b*T + t). */
export const gptLogits = (c: GptConfig, p: Params, idx: tf.Tensor2D): tf.Tensor2D => {
  const [B, T] = idx.shape
  let x = embed(c, p, idx)
  for (let l = 0; l < c.layers; l++) x = block(c, p, l, x, B, T)
  return head(p, x)
}

/** T of a batch (tokens [B, T+1]). */
const seqLenOf = (batch: Batch): number => batch.tensors.get("tokens")!.length / batch.size - 1

/** Split a batch into inputs [B, T] and targets [B*T] (int32). */
export const gptInputsTargets = (batch: Batch): { x: Int32Array; y: Int32Array; B: number; T: number } => {
  const tokens = batch.tensors.get("tokens") as Int32Array | undefined
  const B = batch.size
  if (tokens === undefined || tokens.length % B !== 0 || tokens.length / B < 2) {
    throw new Error(`gpt batch: tokens has ${tokens?.length} ids, expected B*(T+1) with B = ${B} and T >= 1`)
  }
  const T = tokens.length / B - 1
  const x = new Int32Array(B * T)
  const y = new Int32Array(B * T)
  for (let b = 0; b < B; b++) {
    x.set(tokens.subarray(b * (T + 1), b * (T + 1) + T), b * T)
    y.set(tokens.subarray(b * (T + 1) + 1, (b + 1) * (T + 1)), b * T)
  }
  return { x, y, B, T }
}

/** The chain. Block h.N reads every `h.N.` spec: its base tensors, then its adapters. */
export const gptBlocks = (c: GptConfig): Block[] => {
  const specs = gptSpecs(c)
  const layerParams = (l: number) => specs.filter((s) => s.name.startsWith(`h.${l}.`)).map((s) => s.name)
  return [
    {
      name: "embed",
      params: ["wte", "wpe"],
      forward: (p, _x, batch) => {
        const { x, B, T } = gptInputsTargets(batch)
        return embed(c, p, tf.tensor2d(x, [B, T], "int32"))
      },
      flops: (T) => 2 * T * c.width // a lookup and an add
    },
    ...Array.from({ length: c.layers }, (_, l): Block => ({
      name: `h.${l}`,
      params: layerParams(l),
      forward: (p, x, batch) => block(c, p, l, x as tf.Tensor2D, batch.size, seqLenOf(batch)),
      // per position: qkv, proj and the 4× MLP (12 d² multiply-adds), and the attention scores and mix (2 T d)
      flops: (T) => 2 * T * (12 * c.width * c.width + 2 * T * c.width)
    })),
    { name: "head", params: ["ln_f.weight", "ln_f.bias", "wte"], forward: (p, x) => head(p, x as tf.Tensor2D), flops: (T) => 2 * T * c.width * c.vocabSize }
  ]
}

export const makeGpt = (config: Partial<GptConfig> = {}): GptDef => {
  const c = resolveGptConfig(config)
  const specs = gptSpecs(c)
  const targets = (batch: Batch) => tf.tensor1d(gptInputsTargets(batch).y, "int32")
  return {
    kind: "gpt",
    task: "lm",
    config: c,
    specs,
    batch: [{ name: "tokens", dtype: "int32", shape: ["B", "*"], doc: `B windows of T+1 token ids (T ≤ ${c.contextLength}): inputs [:T], targets [1:]`, below: c.vocabSize }],
    blocks: gptBlocks(c),
    init: (seed) => gptInit(c, specs, seed),
    // mean next-token cross-entropy over B*T positions
    objective: (logits, batch) => softmaxCrossEntropy(logits as tf.Tensor2D, targets(batch)),
    score: (logits, batch) => {
      const n = batch.size * seqLenOf(batch)
      return { loss: softmaxCrossEntropy(logits as tf.Tensor2D, targets(batch)).dataSync()[0] * n, n }
    },
    summarize: (s) => {
      const loss = (s["loss"] ?? Number.NaN) / (s["n"] ?? 0)
      return { loss, perplexity: Math.exp(loss) }
    },
    metrics: [
      { key: "loss", label: "val", better: "lower" },
      { key: "perplexity", label: "ppl", better: "lower" }
    ],
    units: (batch) => ({ n: batch.size * seqLenOf(batch), unit: "tokens" })
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
