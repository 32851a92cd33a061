/**
 * Implements: one attempt of one pipeline step, as one stage sees it (a `Run`) — its data
 * (the micro-batches' inputs, targets, upstream gradients, the summed gradients), the
 * schedule's choice of the next op from the ready work, the stash it holds, and the step's
 * gradient once every micro-batch is done. Pure functions over plain data; the stage's
 * reducer (stage-core.ts) owns when a run starts, is retried or dropped, and what is sent.
 *
 * The schedule is only the order a stage picks from its ready work: 1F1B runs a backward
 * whenever one is ready and holds at most S−k stashed inputs on stage k (S on stage 0);
 * GPipe runs every forward first (M stashed), then drains. The last stage runs forward and
 * backward in one op, so it stashes only the activations waiting for it.
 */
import type { BatchLeased } from "../../shared/protocol/messages.ts"
import type { Batch as ModelBatch } from "../../shared/models/model.ts"
import type { Activation } from "../../shared/models/pipeline.ts"

/** What of a stage's config the schedule reads. */
export interface Schedule {
  readonly schedule: "1f1b" | "gpipe"
  readonly stage: number
  readonly stages: number
  readonly micros: number
}

export interface MicroMeta {
  readonly batchId: string
  readonly rows: number
  readonly length: number
  /** tokens or samples (throughput). */
  readonly units: number
  readonly gen: number
  readonly epochBatches: number
}

/** A leased batch (stage 0). */
export interface LeasedBatch {
  readonly meta: BatchLeased
  readonly data: ModelBatch
  readonly micro: MicroMeta
}

/** One attempt of one step, as this stage sees it. */
export interface Run {
  readonly key: string
  readonly version: number
  readonly attempt: number
  readonly stepId: string
  readonly micros: (MicroMeta | undefined)[]
  /** stage 0: the batches; others: the activation received. Kept until the micro-batch's backward. */
  readonly inputs: Map<number, ModelBatch | Activation>
  /** last stage: the micro-batches' batches (targets), fetched from the loader. */
  readonly labels: Map<number, ModelBatch>
  readonly fetching: Set<number>
  readonly forwarded: Set<number>
  readonly dys: Map<number, Activation>
  readonly done: Set<number>
  readonly losses: Map<number, number>
  /** summed gradients of this stage's trainable params over the done micro-batches. */
  acc?: Map<string, Float32Array>
  /** stage 0: the last stage's summed part of the tied weights' gradient. */
  tiedIn?: ReadonlyMap<string, Float32Array>
  flushed: boolean
  startedAt: number
  lastProgress: number
  forwardMs: number
  backwardMs: number
  stashPeak: number
  stashPeakBytes: number
  /** stage 0: the leased batches of this step (handed back when it is dropped). */
  readonly leased: readonly LeasedBatch[]
}

/** What a step op needs; the shell computes it and sends the result on (stage.ts). */
export interface OpTarget {
  readonly key: string
  readonly version: number
  readonly attempt: number
  readonly stepId: string
  readonly micro: number
  readonly micros: number
  readonly meta: MicroMeta
}

export const runKey = (version: number, attempt: number, stepId: string) => `${version}/${attempt}/${stepId}`

/** The most inputs a stage keeps for their backward: 1F1B S−k (stage 0: S), GPipe M. */
export const stashLimit = (cfg: Schedule): number => (cfg.schedule === "gpipe" ? cfg.micros : cfg.stages - cfg.stage)

export const newRun = (version: number, attempt: number, stepId: string, micros: number, now: number, leased: readonly LeasedBatch[]): Run => ({
  key: runKey(version, attempt, stepId), version, attempt, stepId, micros: new Array(micros).fill(undefined),
  inputs: new Map(), labels: new Map(), fetching: new Set(), forwarded: new Set(), dys: new Map(), done: new Set(), losses: new Map(),
  flushed: false, startedAt: now, lastProgress: now, forwardMs: 0, backwardMs: 0, stashPeak: 0, stashPeakBytes: 0, leased
})

/** Stage 0's run of its leased batches (a new step, or another attempt of one): they are its inputs. */
export const runOfLeased = (version: number, attempt: number, leased: readonly LeasedBatch[], now: number): Run => {
  const r = newRun(version, attempt, leased.map((b) => b.meta.batchId).join("+"), leased.length, now, leased)
  leased.forEach((b, m) => {
    r.micros[m] = b.micro
    r.inputs.set(m, b.data)
  })
  return r
}

export const opOf = (r: Run, m: number): OpTarget => ({ key: r.key, version: r.version, attempt: r.attempt, stepId: r.stepId, micro: m, micros: r.micros.length, meta: r.micros[m]! })

const inputBytes = (x: ModelBatch | Activation): number =>
  "data" in x ? x.data.byteLength : [...x.tensors.values()].reduce((n, t) => n + t.byteLength, 0)

/** The micro-batches whose input is held for their backward: forwarded and not yet done (the last stage: arrived and not yet done). */
export const stashed = (r: Run, last: boolean): number[] =>
  last ? [...r.inputs.keys()].filter((m) => !r.done.has(m)) : [...r.forwarded].filter((m) => !r.done.has(m))

/** Record the stash's peak (count and bytes) after it grew. */
export const notePeak = (r: Run, last: boolean): void => {
  const held = stashed(r, last)
  if (held.length <= r.stashPeak) return
  r.stashPeak = held.length
  r.stashPeakBytes = held.reduce((n, m) => n + inputBytes(r.inputs.get(m)!), 0)
}

/** The schedule's next op from the ready work, if any. */
export const pickOp = (r: Run, cfg: Schedule): { readonly kind: "F" | "B"; readonly micro: number } | undefined => {
  const last = cfg.stage === cfg.stages - 1
  let fwd: number | undefined
  let bwd: number | undefined
  for (let m = 0; m < r.micros.length; m++) {
    if (last) {
      if (bwd === undefined && !r.done.has(m) && r.inputs.has(m) && r.labels.has(m)) bwd = m
      continue
    }
    if (fwd === undefined && !r.forwarded.has(m) && r.inputs.has(m)) fwd = m
    if (bwd === undefined && r.forwarded.has(m) && !r.done.has(m) && r.dys.has(m)) bwd = m
  }
  const canFwd = fwd !== undefined && stashed(r, false).length < stashLimit(cfg)
  const first = cfg.schedule === "1f1b" ? (bwd !== undefined ? "B" : canFwd ? "F" : undefined) : canFwd ? "F" : bwd !== undefined ? "B" : undefined
  return first === "F" ? { kind: "F", micro: fwd! } : first === "B" ? { kind: "B", micro: bwd! } : undefined
}

/** A micro-batch's backward is done: add its gradients to the run's sums (the first one's arrays become the sums). */
export const addGrads = (r: Run, grads: ReadonlyMap<string, Float32Array>): void => {
  if (!r.acc) {
    r.acc = new Map(grads) // the shell hands over arrays it keeps no reference to
    return
  }
  for (const [k, g] of grads) {
    const a = r.acc.get(k)!
    for (let i = 0; i < g.length; i++) a[i] += g[i]
  }
}

/**
 * Every micro-batch done: the step's rows, units and mean loss, and its gradient sums with
 * the tied part received (stage 0) added. `mean` names the tensors to turn into the mean in
 * place (the pushed ones: a second copy of a big stage's gradient would cost its size); the
 * others (the tied part the last stage sends) stay sums.
 */
export const stepGradient = (r: Run, mean: Iterable<string>): { readonly acc: Map<string, Float32Array>; readonly rows: number; readonly units: number; readonly loss: number } => {
  const acc = r.acc ?? new Map<string, Float32Array>()
  const metas = r.micros as MicroMeta[]
  const rows = metas.reduce((n, m) => n + m.rows, 0)
  const units = metas.reduce((n, m) => n + m.units, 0)
  const loss = metas.reduce((l, m, i) => l + (r.losses.get(i) ?? Number.NaN) * m.rows, 0) / rows
  if (r.tiedIn) for (const [k, g] of r.tiedIn) {
    const a = acc.get(k)
    if (a) for (let i = 0; i < g.length; i++) a[i] += g[i]
  }
  for (const name of mean) {
    const a = acc.get(name)!
    for (let i = 0; i < a.length; i++) a[i] /= rows
  }
  return { acc, rows, units, loss }
}
