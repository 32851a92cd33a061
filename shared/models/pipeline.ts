/**
 * Implements: a job's pipeline cut and the maths of one stage — which blocks and params
 * each of `topology.stages` stages holds (`stagesForJob`), which parameter-server shards
 * own which tensors (`shardOfForJob`: stage k's tensors on shards [k·P/S, (k+1)·P/S)), and
 * one stage's forward and backward on plain arrays (`stageForward`, `stageBackward`).
 *
 * The loss is scaled in one place: the last stage differentiates the SUM of its
 * micro-batch's losses (mean × rows); every stage adds its micro-batch gradients and the
 * flush divides by the step's rows, so a pipelined gradient is the same number as the
 * unpipelined mean over the whole batch.
 *
 * Tied weights (the GPT's `wte`, read by the embedding in stage 0 and the head in stage
 * S−1): owned by the first stage that reads it (its shard holds it, that stage pushes its
 * gradient); the last stage reads it from that shard and sends its part of the gradient to
 * the owner once per step (actors/worker/stage.ts), which adds it before pushing. That is
 * the default and the only mode: the pipelined model is exactly the single-process one,
 * so its checkpoints, evaluation and export need nothing new.
 *
 * TensorFlow.js keeps no tape between calls, so a stage that is not the last keeps its
 * input and recomputes its forward inside the backward (tf.grads reruns f): one extra
 * forward per micro-batch on every stage but the last (bench/pipeline.ts measures it).
 * Does not own: the schedule and messages (actors/worker/stage-core.ts, stage.ts).
 */
import * as tf from "@tensorflow/tfjs"
import type { JobConfig } from "../config/job.ts"
import { gptActivationBytes, wasmHeapProblem } from "../compute/memory.ts"
import { assignShards } from "../protocol/sharding.ts"
import { batchOf, cutStages, runStage, sizeOf, type Batch, type BatchArray, type ModelDef, type Partition, type Stage } from "./model.ts"

/** A float32 activation (or activation gradient) as it crosses between stages. */
export interface Activation {
  readonly data: Float32Array
  readonly shape: readonly number[]
}

/** The job's partition for `def` (layer counts are turned into block counts). */
export const partitionOf = (job: JobConfig, def: ModelDef): Partition => {
  const p = job.topology.partition
  if (p === "params") return { by: "params" }
  if (p === "flops") return { by: "flops", length: lengthOf(job) }
  const sum = p.reduce((a, b) => a + b, 0)
  const n = def.blocks.length
  // counts of every block, or of the layers between the first block (embedding) and the last (head)
  if (sum === n) return { blocks: p }
  if (sum === n - 2 && p.length >= 1) return { blocks: p.map((c, k) => c + (k === 0 ? 1 : 0) + (k === p.length - 1 ? 1 : 0)) }
  throw new Error(`topology.partition [${p}] sums to ${sum}: give the ${n - 2} layers or all ${n} blocks (${def.blocks.map((b) => b.name).join(", ")})`)
}

/** positions per row, for a FLOPs-balanced cut. */
const lengthOf = (job: JobConfig): number => {
  const m = job.model as { kind: string; contextLength?: number; maxLen?: number }
  return m.contextLength ?? m.maxLen ?? 1
}

/** The job's stages (one stage when it has no pipeline). */
export const stagesForJob = (job: JobConfig, def: ModelDef): Stage[] =>
  job.topology.stages === 1 ? cutStages(def, 1) : cutStages(def, job.topology.stages, partitionOf(job, def))

/** The first stage that reads each param (its owner: the stage that pushes its gradient). */
export const ownerStage = (stages: readonly Stage[]): Map<string, number> => {
  const out = new Map<string, number>()
  for (const st of stages) for (const p of st.params) if (!out.has(p.name)) out.set(p.name, st.index)
  return out
}

/**
 * Shard of every tensor. One stage: the balanced assignment over all shards. S stages:
 * each stage's owned tensors over its own P/S shards (balanced among them).
 */
export const shardOfForJob = (job: JobConfig, def: ModelDef): Map<string, number> => {
  const { stages: S, psShards: P } = job.topology
  if (S === 1) return assignShards(def.specs, P)
  const stages = stagesForJob(job, def)
  const owner = ownerStage(stages)
  const per = P / S
  const out = new Map<string, number>()
  for (const st of stages) {
    const owned = def.specs.filter((s) => owner.get(s.name) === st.index)
    for (const [name, k] of assignShards(owned, per)) out.set(name, st.index * per + k)
  }
  return out
}

/** What stage k of a job touches: the shards it reads params from, and the shards it pushes to (its own). */
export const stageShards = (job: JobConfig, def: ModelDef, k: number): { readonly reads: number[]; readonly owns: number[] } => {
  const st = stagesForJob(job, def)[k]
  const shardOf = shardOfForJob(job, def)
  const reads = [...new Set(st.params.map((p) => shardOf.get(p.name)!))].sort((a, b) => a - b)
  const per = job.topology.psShards / job.topology.stages
  return { reads, owns: Array.from({ length: per }, (_, i) => k * per + i) }
}

/** A batch with the real row count and length but zero values: what a middle stage's blocks need (dims, never token values). */
export const shapeBatch = (def: ModelDef, rows: number, length: number): Batch => {
  const t: Record<string, BatchArray> = {}
  for (const spec of def.batch) {
    const n = spec.shape.reduce<number>((m, d) => m * (d === "B" ? rows : d === "*" ? length : d), 1)
    t[spec.name] = spec.dtype === "int32" ? new Int32Array(n) : new Float32Array(n)
  }
  return batchOf(rows, t)
}

/** The free length ("*") of a batch, as `shapeBatch` takes it. */
export const freeLength = (def: ModelDef, batch: Batch): number => {
  for (const spec of def.batch) {
    const i = spec.shape.indexOf("*")
    if (i < 0) continue
    const fixed = spec.shape.reduce<number>((m, d) => m * (d === "B" ? batch.size : d === "*" ? 1 : d), 1)
    return batch.tensors.get(spec.name)!.length / fixed
  }
  return 1
}

/** A stage's params as tensors, for one params version: built once and reused by every op on it (not a copy per op). Caller disposes. */
export const stageTensors = (stage: Stage, params: ReadonlyMap<string, Float32Array>): Map<string, tf.Tensor> => {
  const out = new Map<string, tf.Tensor>()
  for (const s of stage.params) {
    const v = params.get(s.name)
    if (v === undefined) throw new Error(`stage ${stage.index}: missing parameter "${s.name}"`)
    if (v.length !== sizeOf(s.shape)) throw new Error(`stage ${stage.index}: parameter "${s.name}" has ${v.length} values, shape [${s.shape}] needs ${sizeOf(s.shape)}`)
    out.set(s.name, tf.tensor(v, [...s.shape], "float32"))
  }
  return out
}

/** Tensors as given (kept by the caller), or made from arrays (inside the caller's tidy). */
const asTensors = (stage: Stage, params: ReadonlyMap<string, Float32Array> | ReadonlyMap<string, tf.Tensor>): ReadonlyMap<string, tf.Tensor> => {
  const first = params.values().next().value
  return first instanceof tf.Tensor ? (params as ReadonlyMap<string, tf.Tensor>) : stageTensors(stage, params as ReadonlyMap<string, Float32Array>)
}

const read = (t: tf.Tensor): Float32Array => {
  const v = t.dataSync() as Float32Array
  return tf.getBackend() === "wasm" ? v : new Float32Array(v)
}

/** Stage `stage` (not the last) on its input: the activation for the next stage. */
export const stageForward = (
  stage: Stage,
  params: ReadonlyMap<string, Float32Array> | ReadonlyMap<string, tf.Tensor>,
  x: Activation | undefined,
  batch: Batch
): Activation =>
  tf.tidy(() => {
    const p = asTensors(stage, params)
    const y = runStage(stage, p, x === undefined ? undefined : tf.tensor(x.data, [...x.shape], "float32"), batch)
    return { data: read(y), shape: y.shape }
  })

export interface StageGrads {
  /** gradients of the SUM of the micro-batch's losses (see the top), per trainable param of the stage. */
  readonly grads: Map<string, Float32Array>
  /** the gradient for the previous stage's output (absent on stage 0). */
  readonly dx?: Activation
  /** last stage: the micro-batch's mean loss. */
  readonly loss?: number
}

/**
 * Backward of one micro-batch on one stage: the last stage from its input and the batch
 * (its loss is the sum over the rows); the others from their stashed input and the next
 * stage's `dy`, recomputing their forward. Leaves no tensor behind.
 */
export const stageBackward = (
  def: ModelDef,
  stage: Stage,
  params: ReadonlyMap<string, Float32Array> | ReadonlyMap<string, tf.Tensor>,
  x: Activation | undefined,
  batch: Batch,
  dy: Activation | undefined,
  trainable: ReadonlySet<string>
): StageGrads => {
  const grads = new Map<string, Float32Array>()
  let dx: Activation | undefined
  let loss: number | undefined
  tf.tidy(() => {
    const p = asTensors(stage, params)
    const wrt = stage.params.filter((s) => trainable.has(s.name))
    const xt = x === undefined ? undefined : tf.tensor(x.data, [...x.shape], "float32")
    const xs = [...wrt.map((s) => p.get(s.name)!), ...(xt ? [xt] : [])]
    if (stage.last) {
      const f = () => tf.mul(def.objective(runStage(stage, p, xt, batch), batch), batch.size) as tf.Scalar
      const r = tf.engine().gradients(f, xs, undefined, true)
      loss = r.value.dataSync()[0] / batch.size
      collect(r.grads)
    } else {
      if (dy === undefined) throw new Error(`stage ${stage.index}: a backward needs the next stage's gradient`)
      const dyt = tf.tensor(dy.data, [...dy.shape], "float32")
      const r = tf.engine().gradients(() => runStage(stage, p, xt, batch), xs, dyt, true)
      collect(r.grads)
    }
    function collect(gs: readonly (tf.Tensor | null)[]) {
      wrt.forEach((s, i) => grads.set(s.name, gs[i] == null ? new Float32Array(sizeOf(s.shape)) : read(gs[i]!)))
      if (xt) dx = { data: gs[wrt.length] == null ? new Float32Array(x!.data.length) : read(gs[wrt.length]!), shape: x!.shape }
    }
  })
  return { grads, dx, loss }
}

/** Why a training step of the whole model (or of one stage) cannot fit the wasm heap, if it cannot (shared/compute/memory.ts). */
export const heapProblemFor = (job: JobConfig, def: ModelDef, stage?: Stage): string | undefined => {
  const params = (stage ? stage.params : def.specs).reduce((n, s) => n + sizeOf(s.shape), 0)
  const layers = (stage ? stage.blocks : def.blocks).filter((b) => /^h\.\d+$/.test(b.name)).length
  const m = job.model as { kind: string; contextLength?: number; width?: number; heads?: number }
  const act = m.kind === "gpt" ? gptActivationBytes(m as { contextLength: number; width: number; heads: number }, layers, job.data.batchSize) : 0
  return wasmHeapProblem(stage ? `${def.kind} stage ${stage.index} of ${job.topology.stages}` : `${def.kind} (${job.job})`, params, act)
}

/**
 * The reassembly limits of a job's tensor bundles (shared/wire/frames.ts, budget.ts),
 * derived from its model, so a receiver holds no more than the job can need: a message is
 * at most twice its largest f32 content (a shard's params or gradient, or, in a pipeline,
 * a micro-batch's activation; twice for topk:1, values and indices) plus 1 MiB; each
 * sender (a worker, shard or stage: workers × stages + shards + 2 of them) may hold 8
 * incomplete messages and 4 messages' worth of bytes, all known senders together two
 * messages each, and every unknown sender together 8 messages and two messages' worth.
 * A message with no new chunk for 10 s is dropped.
 */
export const bundleLimits = (job: JobConfig, def: ModelDef) => {
  const shardOf = shardOfForJob(job, def)
  const bytes = new Map<number, number>()
  for (const s of def.specs) bytes.set(shardOf.get(s.name)!, (bytes.get(shardOf.get(s.name)!) ?? 0) + 4 * sizeOf(s.shape))
  const m = job.model as { kind: string; contextLength?: number; maxLen?: number; width?: number; embedDim?: number; hidden?: number; dense?: number }
  // an activation between stages: [B, L, widest layer] float32 (a GPT's residual stream; an LSTM's sequence or state)
  const act = job.topology.stages > 1 ? 4 * job.data.batchSize * (m.contextLength ?? m.maxLen ?? 1) * Math.max(m.width ?? 0, m.embedDim ?? 0, 4 * (m.hidden ?? 0), m.dense ?? 0) : 0
  const largest = Math.max(0, act, ...bytes.values())
  const maxMessageBytes = 2 * largest + 2 ** 20
  const senders = job.topology.workers * job.topology.stages + job.topology.psShards + 2
  return {
    maxMessageBytes,
    maxOutstandingMessages: Math.max(64, 4 * senders),
    maxOutstandingBytes: 2 * senders * maxMessageBytes,
    maxMessagesPerSender: 8,
    maxBytesPerSender: 4 * maxMessageBytes,
    maxUnknownMessages: 8,
    maxUnknownBytes: 2 * maxMessageBytes,
    timeoutMs: 10_000
  }
}
