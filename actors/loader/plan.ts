/**
 * Implements: the loader's batch plan — how a corpus becomes batches.
 *
 * Shapes: T = sequence length, B = sequences per batch. A batch is B windows of T + 1
 * byte tokens (inputs [:T], targets [1:]), laid out as Int32Array B × (T + 1).
 * Train windows are non-overlapping cuts of the train split, shuffled per epoch by a
 * seeded permutation (same seed → same batches on every host and every restart).
 * Validation batches are the first `valBatches` × B windows of the val split, in order.
 * Does not own: the lease table (core.ts), batch ids (shared/protocol/applied-log.ts,
 * re-exported here). No I/O and no clocks.
 */
import { CorpusError } from "../../shared/data/corpus.ts"

export { batchId, parseBatchId } from "../../shared/protocol/applied-log.ts"

export interface PlanOptions {
  readonly T: number
  readonly B: number
  readonly valFraction: number
  readonly seed: number
  readonly valBatches: number
}

export interface LmPlan extends PlanOptions {
  readonly train: Uint8Array
  readonly val: Uint8Array
  readonly trainWindows: number
  readonly batchesPerEpoch: number
}

/** mulberry32: a small, fast, seedable PRNG (deterministic across hosts). */
export const mulberry32 = (seed: number) => {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/** A seeded Fisher–Yates permutation of 0..n-1. */
export const permutation = (n: number, seed: number): Uint32Array => {
  const p = new Uint32Array(n)
  for (let i = 0; i < n; i++) p[i] = i
  const rnd = mulberry32(seed)
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1))
    const t = p[i]
    p[i] = p[j]
    p[j] = t
  }
  return p
}

export const makeLmPlan = (bytes: Uint8Array, o: PlanOptions): LmPlan => {
  const need = (o.T + 1) * o.B
  const nVal = Math.floor(bytes.length * o.valFraction)
  const val = bytes.subarray(bytes.length - nVal)
  const train = bytes.subarray(0, bytes.length - nVal)
  const trainWindows = Math.floor((train.length - 1) / o.T)
  const batchesPerEpoch = Math.floor(trainWindows / o.B)
  if (batchesPerEpoch < 1) {
    throw new CorpusError(
      `corpus too small: its train split has ${train.length} bytes, one batch of ${o.B} × ${o.T + 1} tokens needs ${need}`
    )
  }
  if (o.valBatches > 0 && o.valFraction > 0 && Math.floor((val.length - 1) / o.T) < o.B) {
    throw new CorpusError(
      `corpus too small for validation: its val split has ${val.length} bytes, one batch needs ${need}; lower data.valFraction to 0 or give more text`
    )
  }
  return { ...o, train, val, trainWindows, batchesPerEpoch }
}

/** The seeded shuffle of `n` train items for each epoch (the same on every host), the last few cached. */
export const epochPermutations = (n: number, seed: number): ((epoch: number) => Uint32Array) => {
  const byEpoch = new Map<number, Uint32Array>()
  return (epoch) => {
    let p = byEpoch.get(epoch)
    if (!p) {
      p = permutation(n, (seed * 1_000_003 + epoch) >>> 0)
      if (byEpoch.size > 4) byEpoch.clear()
      byEpoch.set(epoch, p)
    }
    return p
  }
}

const epochPerms = new WeakMap<LmPlan, (epoch: number) => Uint32Array>()

const epochPermutation = (plan: LmPlan, epoch: number): Uint32Array => {
  let perms = epochPerms.get(plan)
  if (!perms) epochPerms.set(plan, (perms = epochPermutations(plan.trainWindows, plan.seed)))
  return perms(epoch)
}

const cut = (src: Uint8Array, starts: ArrayLike<number>, T: number): Int32Array => {
  const out = new Int32Array(starts.length * (T + 1))
  for (let b = 0; b < starts.length; b++) {
    const s = starts[b]
    for (let t = 0; t <= T; t++) out[b * (T + 1) + t] = src[s + t]
  }
  return out
}

/** Tokens of train batch (epoch, index): Int32Array B × (T + 1). */
export const trainBatch = (plan: LmPlan, epoch: number, index: number): Int32Array => {
  if (index < 0 || index >= plan.batchesPerEpoch) throw new RangeError(`batch index ${index} out of range`)
  const perm = epochPermutation(plan, epoch)
  const starts = Array.from({ length: plan.B }, (_, b) => perm[index * plan.B + b] * plan.T)
  return cut(plan.train, starts, plan.T)
}

/** Tokens of validation batch `index` (0 ≤ index < valBatches). */
export const valBatch = (plan: LmPlan, index: number): Int32Array => {
  const starts = Array.from({ length: plan.B }, (_, b) => (index * plan.B + b) * plan.T)
  if (starts[starts.length - 1] + plan.T + 1 > plan.val.length) throw new RangeError(`val batch ${index} out of range`)
  return cut(plan.val, starts, plan.T)
}
