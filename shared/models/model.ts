// Implements: the model contract the worker, the evaluator, the loader and the parameter
// server share, and the helpers that run one on plain arrays (loss, loss + gradients,
// validation metrics, stages).
// Owns: ModelDef (params, the batch it eats, its blocks, its objective and metrics),
// Batch, Stage/cutStages, and the tensor bookkeeping around a loss (create, tidy, read
// back, dispose). Does not own: any model's maths (gpt.ts, lstm-classifier.ts), data
// (actors/loader), the optimizer (parameter server), or backend choice.
//
// A model is a chain of blocks: block 0 takes the batch, each next block the previous
// one's output, and the last one's output (logits) goes to the objective (the mean loss)
// and to `score` (metric sums over the batch). Parameters cross actors as
// Map<name, Float32Array> in `specs` order; each block names the params it reads, so a
// model cut into consecutive stages (cutStages) gives each stage its own params, and the
// composition of the stages is exactly `loss`. A batch is named tensors (`batch` spec:
// dtype and shape, "B" for the batch dimension); the same arrays travel on the wire as a
// tensor bundle (shared/wire/tensor.ts).

import * as tf from "@tensorflow/tfjs"

export interface ParamSpec {
  readonly name: string
  readonly shape: readonly number[]
}

/** What a model is trained to do; the loader serves a plan per task. */
export type Task = "lm" | "classify"

export type BatchDType = "int32" | "float32"
export type BatchArray = Int32Array | Float32Array

/** One named tensor of a batch. "B" is the batch dimension (rows); "*" one free length (at most one, > 0); numbers are fixed. */
export interface BatchTensorSpec {
  readonly name: string
  readonly dtype: BatchDType
  readonly shape: readonly (number | "B" | "*")[]
  readonly doc: string
  /** int32 ids: every value must be in [0, below) (a vocabulary's size). */
  readonly below?: number
}

/** A batch: `size` rows of named tensors, row-major, as the model's `batch` spec says. */
export interface Batch {
  readonly size: number
  readonly tensors: ReadonlyMap<string, BatchArray>
}

export type Params = ReadonlyMap<string, tf.Tensor>

/** A consecutive piece of a model: reads `params`, maps the previous block's output (undefined for block 0) to its own. */
export interface Block {
  readonly name: string
  readonly params: readonly string[]
  forward(p: Params, x: tf.Tensor | undefined, batch: Batch): tf.Tensor
  /** forward multiply-adds ×2 for one batch row of `length` positions (a FLOPs-balanced pipeline cut); default 2 per param per position. */
  flops?(length: number): number
}

/** A validation metric the model reports: its key, and how the progress line prints it. */
export interface MetricSpec {
  readonly key: string
  readonly label: string
  /** higher is better (accuracy) or lower (loss, perplexity). */
  readonly better: "higher" | "lower"
}

export interface ModelDef {
  readonly kind: string
  readonly task: Task
  /** The resolved config (every default filled in), printed at start-up. */
  readonly config: unknown
  /** Fixed, deterministic order: the wire and checkpoint order of the parameters. */
  readonly specs: readonly ParamSpec[]
  /** The batch this model eats (the loader's plan makes exactly this). */
  readonly batch: readonly BatchTensorSpec[]
  /** The chain; their composition then `objective` is the loss. */
  readonly blocks: readonly Block[]
  /** Deterministic init from a seed (shared/models/rng.ts), one array per spec. */
  init(seed: number): Map<string, Float32Array>
  /** Mean loss over the batch from the last block's output; pure. */
  objective(out: tf.Tensor, batch: Batch): tf.Scalar
  /** Metric sums over the batch from the last block's output (summed over batches, then `summarize`d). */
  score(out: tf.Tensor, batch: Batch): Record<string, number>
  /** Metric sums of one or more batches → the reported metrics (the first is the loss). */
  summarize(sums: Readonly<Record<string, number>>): Record<string, number>
  readonly metrics: readonly MetricSpec[]
  /** What a batch row counts as for throughput: tokens (LM) or samples (classify). */
  units(batch: Batch): { readonly n: number; readonly unit: "tokens" | "samples" }
}

export const sizeOf = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1)

export const countParams = (def: ModelDef): number =>
  def.specs.reduce((n, s) => n + sizeOf(s.shape), 0)

/** Throws with the offending name when `params` does not match `def.specs`. */
export const checkParams = (def: ModelDef, params: ReadonlyMap<string, Float32Array>): void => {
  for (const s of def.specs) {
    const v = params.get(s.name)
    if (v === undefined) throw new Error(`${def.kind}: missing parameter "${s.name}"`)
    if (v.length !== sizeOf(s.shape)) {
      throw new Error(`${def.kind}: parameter "${s.name}" has ${v.length} values, shape [${s.shape}] needs ${sizeOf(s.shape)}`)
    }
  }
}

/** Named float32 tensors for `params`, in spec order. Caller disposes (or runs in a tidy). */
export const toTensors = (
  def: ModelDef,
  params: ReadonlyMap<string, Float32Array>
): Map<string, tf.Tensor> => {
  checkParams(def, params)
  const out = new Map<string, tf.Tensor>()
  for (const s of def.specs) out.set(s.name, tf.tensor(params.get(s.name)!, [...s.shape], "float32"))
  return out
}

/** A copy of a tensor's values that nothing else aliases (the cpu backend hands out its
 *  backing array; wasm's dataSync is already a copy of its heap). */
const readFloats = (t: tf.Tensor): Float32Array => {
  const v = t.dataSync() as Float32Array
  return tf.getBackend() === "wasm" ? v : new Float32Array(v)
}

/**
 * Loss and gradients of every parameter (or of those in `only`: the others are constants,
 * a frozen tensor's gradient is never computed), as plain arrays. Leaves no tensor behind.
 * A parameter the loss does not reach gets a zero gradient.
 */
export const lossAndGrads = (
  def: ModelDef,
  params: ReadonlyMap<string, Float32Array>,
  batch: Batch,
  only?: ReadonlySet<string>
): { loss: number; grads: Map<string, Float32Array> } => {
  let loss = Number.NaN
  const grads = new Map<string, Float32Array>()
  tf.tidy(() => {
    checkBatch(def, batch)
    const named = toTensors(def, params)
    const wrt = def.specs.filter((s) => only === undefined || only.has(s.name))
    const xs = wrt.map((s) => named.get(s.name)!)
    // allowNoGradients: a null gradient becomes zeros below instead of an exception.
    const res = tf.engine().gradients(() => lossOf(def, named, batch), xs, undefined, true)
    loss = res.value.dataSync()[0]
    wrt.forEach((s, i) => {
      const g = res.grads[i]
      grads.set(s.name, g == null ? new Float32Array(sizeOf(s.shape)) : readFloats(g))
    })
  })
  return { loss, grads }
}

/** The model's output (the last block's) for a batch. Call inside a tidy. */
export const forward = (def: ModelDef, p: Params, batch: Batch): tf.Tensor => {
  let x: tf.Tensor | undefined
  for (const b of def.blocks) x = b.forward(p, x, batch)
  if (x === undefined) throw new Error(`${def.kind}: a model needs at least one block`)
  return x
}

/** Mean loss of a batch as a tensor (the thing differentiated). Call inside a tidy. */
export const lossOf = (def: ModelDef, p: Params, batch: Batch): tf.Scalar => def.objective(forward(def, p, batch), batch)

/** The loss alone (no tape, no gradients). Leaves no tensor behind. */
export const evalLoss = (def: ModelDef, params: ReadonlyMap<string, Float32Array>, batch: Batch): number => {
  checkBatch(def, batch)
  return tf.tidy(() => lossOf(def, toTensors(def, params), batch).dataSync()[0])
}

/** Metric sums of one batch (add them over batches, then `def.summarize`). Leaves no tensor behind. */
export const scoreBatch = (def: ModelDef, params: ReadonlyMap<string, Float32Array>, batch: Batch): Record<string, number> => {
  checkBatch(def, batch)
  return tf.tidy(() => def.score(forward(def, toTensors(def, params), batch), batch))
}

/** Add metric sums (a += b). */
export const addSums = (a: Record<string, number>, b: Readonly<Record<string, number>>): Record<string, number> => {
  for (const [k, v] of Object.entries(b)) a[k] = (a[k] ?? 0) + v
  return a
}

// ---------------------------------------------------------------- batches

/** Why a batch does not fit a model's batch spec (names, dtypes, lengths), or undefined when it does. */
export const batchProblem = (def: ModelDef, batch: Batch): string | undefined => {
  if (!Number.isSafeInteger(batch.size) || batch.size < 1) return `${def.kind} batch: size must be a positive integer, got ${batch.size}`
  for (const t of def.batch) {
    const v = batch.tensors.get(t.name)
    if (v === undefined) return `${def.kind} batch: tensor "${t.name}" is missing (${t.doc})`
    const want = t.dtype === "int32" ? Int32Array : Float32Array
    if (!(v instanceof want)) return `${def.kind} batch: tensor "${t.name}" must be ${t.dtype}, got ${v.constructor.name}`
    const n = t.shape.reduce<number>((m, d) => m * (d === "B" ? batch.size : d === "*" ? 1 : d), 1)
    const free = t.shape.includes("*")
    if (free ? v.length === 0 || v.length % n !== 0 : v.length !== n) {
      return `${def.kind} batch: tensor "${t.name}" has ${v.length} values, shape [${t.shape.map((d) => (d === "B" ? batch.size : d))}] needs ${free ? `a positive multiple of ${n}` : n}`
    }
    if (t.below !== undefined) {
      for (let i = 0; i < v.length; i++) {
        if (!(v[i] >= 0 && v[i] < t.below)) return `${def.kind} batch: tensor "${t.name}"[${i}] is ${v[i]}, outside [0, ${t.below}) (the model's vocabulary)`
      }
    }
  }
  for (const name of batch.tensors.keys()) {
    if (!def.batch.some((t) => t.name === name)) return `${def.kind} batch: unexpected tensor "${name}" (the model takes ${def.batch.map((t) => t.name).join(", ")})`
  }
  return undefined
}

export const checkBatch = (def: ModelDef, batch: Batch): void => {
  const p = batchProblem(def, batch)
  if (p !== undefined) throw new Error(p)
}

/** A spec's shape for `length` values of `rows` rows (the free dimension worked out). */
export const shapeOf = (t: BatchTensorSpec, rows: number, length: number): number[] => {
  const fixed = t.shape.reduce<number>((m, d) => m * (d === "B" ? rows : d === "*" ? 1 : d), 1)
  return t.shape.map((d) => (d === "B" ? rows : d === "*" ? length / fixed : d))
}

export const batchOf = (size: number, tensors: Record<string, BatchArray>): Batch => ({ size, tensors: new Map(Object.entries(tensors)) })

/** Batches stacked along their rows (the same tensor names in each): micro-batches → one batch. */
export const concatBatches = (parts: readonly Batch[]): Batch => {
  if (parts.length === 0) throw new Error("concatBatches: no batches")
  const tensors = new Map<string, BatchArray>()
  for (const name of parts[0].tensors.keys()) {
    const arrays = parts.map((p) => {
      const a = p.tensors.get(name)
      if (a === undefined) throw new Error(`concatBatches: a batch lacks tensor "${name}"`)
      return a
    })
    const out = arrays[0] instanceof Int32Array ? new Int32Array(arrays.reduce((n, a) => n + a.length, 0)) : new Float32Array(arrays.reduce((n, a) => n + a.length, 0))
    let off = 0
    for (const a of arrays) {
      out.set(a, off)
      off += a.length
    }
    tensors.set(name, out)
  }
  return { size: parts.reduce((n, p) => n + p.size, 0), tensors }
}

// ---------------------------------------------------------------- stages

/** Consecutive blocks of a model, with the params they read (pipeline parallelism runs one per actor). */
export interface Stage {
  readonly index: number
  readonly blocks: readonly Block[]
  /** every param this stage's blocks read, in spec order. */
  readonly params: readonly ParamSpec[]
  /** those of `params` another stage reads too (tied weights: their gradient is the sum of the stages'). */
  readonly shared: readonly string[]
  /** the last stage ends with the objective. */
  readonly last: boolean
}

/** How to cut: balanced by params or by forward FLOPs (at `length` positions per row), or blocks per stage. */
export type Partition =
  | { readonly by: "params" }
  | { readonly by: "flops"; readonly length: number }
  | { readonly blocks: readonly number[] }

/**
 * Cut a model into `n` stages of consecutive blocks. Balanced (the default, by params):
 * greedy, a stage closes once it holds its share of the weight, leaving a block for each
 * stage after it. `{ blocks }`: that many blocks per stage, in order.
 */
export const cutStages = (def: ModelDef, n: number, partition: Partition = { by: "params" }): Stage[] => {
  const blocks = def.blocks
  if (!Number.isInteger(n) || n < 1 || n > blocks.length) throw new Error(`${def.kind}: cannot cut ${blocks.length} blocks (${blocks.map((b) => b.name).join(", ")}) into ${n} stages`)
  const groups: Block[][] = []
  if ("blocks" in partition) {
    const counts = partition.blocks
    const sum = counts.reduce((a, b) => a + b, 0)
    if (counts.length !== n || sum !== blocks.length || counts.some((c) => !(Number.isInteger(c) && c >= 1))) {
      throw new Error(`${def.kind}: partition [${counts}] must give each of ${n} stages at least one of the ${blocks.length} blocks (${blocks.map((b) => b.name).join(", ")})`)
    }
    let at = 0
    for (const c of counts) {
      groups.push(blocks.slice(at, at + c))
      at += c
    }
  } else {
    const size = new Map(def.specs.map((s) => [s.name, sizeOf(s.shape)]))
    const params = (b: Block) => b.params.reduce((m, p) => m + (size.get(p) ?? 0), 0)
    const weight = partition.by === "params" ? params : (b: Block) => (b.flops ? b.flops(partition.length) : 2 * params(b) * partition.length)
    const total = blocks.reduce((m, b) => m + weight(b), 0)
    let cur: Block[] = []
    let acc = 0
    blocks.forEach((b, i) => {
      // close before this block when adding it overshoots the stage's share by more than stopping short does
      const share = (total * (groups.length + 1)) / n
      const stagesLeft = n - groups.length - 1
      const left = blocks.length - i
      if (cur.length > 0 && stagesLeft > 0 && (left === stagesLeft || acc + weight(b) - share > share - acc)) {
        groups.push(cur)
        cur = []
      }
      cur.push(b)
      acc += weight(b)
    })
    if (cur.length > 0) groups.push(cur)
  }
  const readers = new Map<string, Set<number>>()
  groups.forEach((g, k) => {
    for (const b of g) for (const p of b.params) readers.set(p, (readers.get(p) ?? new Set()).add(k))
  })
  return groups.map((g, k) => ({
    index: k,
    blocks: g,
    params: def.specs.filter((s) => readers.get(s.name)?.has(k)),
    shared: def.specs.filter((s) => readers.get(s.name)?.has(k) && readers.get(s.name)!.size > 1).map((s) => s.name),
    last: k === groups.length - 1
  }))
}

/** Run one stage: its blocks on the previous stage's output (undefined for stage 0). Call inside a tidy. */
export const runStage = (stage: Stage, p: Params, x: tf.Tensor | undefined, batch: Batch): tf.Tensor => {
  let y = x
  for (const b of stage.blocks) y = b.forward(p, y, batch)
  return y!
}
