/**
 * Implements: the loader's pure core — how a corpus becomes batches, and the lease table.
 *
 * Shapes: T = sequence length, B = sequences per batch. A batch is B windows of T + 1
 * byte tokens (inputs [:T], targets [1:]), laid out as Int32Array B × (T + 1).
 * Train windows are non-overlapping cuts of the train split, shuffled per epoch by a
 * seeded permutation (same seed → same batches on every host and every restart).
 * Validation batches are the first `valBatches` × B windows of the val split, in order.
 * No I/O and no clocks here: time is passed in, so the lease logic is unit-testable.
 */
import { CorpusError } from "../../shared/data/corpus.ts"

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

export const batchId = (epoch: number, index: number) => `e${epoch}-b${index}`

export const parseBatchId = (id: string): { epoch: number; index: number } | undefined => {
  const m = /^e(\d+)-b(\d+)$/.exec(id)
  return m ? { epoch: Number(m[1]), index: Number(m[2]) } : undefined
}

const epochPerms = new WeakMap<LmPlan, Map<number, Uint32Array>>()

const epochPermutation = (plan: LmPlan, epoch: number): Uint32Array => {
  let byEpoch = epochPerms.get(plan)
  if (!byEpoch) epochPerms.set(plan, (byEpoch = new Map()))
  let p = byEpoch.get(epoch)
  if (!p) {
    p = permutation(plan.trainWindows, (plan.seed * 1_000_003 + epoch) >>> 0)
    if (byEpoch.size > 4) byEpoch.clear()
    byEpoch.set(epoch, p)
  }
  return p
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

// ---------------------------------------------------------------- lease table

export interface Lease {
  readonly epoch: number
  readonly index: number
  readonly id: string
  readonly worker: string
  readonly attempt: number
  readonly deadline: number
  /** the worker reported pushing its gradient: the batch now waits on the parameter servers. */
  readonly pushed?: boolean
}

/**
 * Which batches are pending, leased (to whom, until when) and done. A batch is done
 * when every parameter-server shard has applied it; a lease that expires, a worker
 * that leaves, or a BatchFailed puts the batch back at the front of the queue. After
 * `maxAttempts` the batch is given up (reported, never retried forever). Epochs follow
 * each other without a gap: when the queue runs dry the next epoch is enqueued.
 */
export class LeaseTable {
  /** the batch indices of an epoch this loader serves (its shard of them). */
  readonly indices: readonly number[]
  readonly leaseMs: number
  readonly maxAttempts: number
  private pending: Array<{ epoch: number; index: number; attempt: number }> = []
  private nextEpoch = 0
  private readonly leases = new Map<string, Lease>()
  private readonly appliedBy = new Map<string, Set<number>>()
  private readonly doneIds = new Set<string>()
  readonly givenUp: string[] = []
  doneCount = 0

  constructor(indices: readonly number[], opts: { leaseMs: number; maxAttempts: number }) {
    if (indices.length === 0) throw new RangeError("a lease table needs at least one batch index")
    this.indices = indices
    this.leaseMs = opts.leaseMs
    this.maxAttempts = opts.maxAttempts
  }

  lease(worker: string, now: number): Lease {
    if (this.pending.length === 0) {
      const e = this.nextEpoch++
      for (const i of this.indices) this.pending.push({ epoch: e, index: i, attempt: 0 })
    }
    const next = this.pending.shift()!
    const l: Lease = {
      epoch: next.epoch,
      index: next.index,
      id: batchId(next.epoch, next.index),
      worker,
      attempt: next.attempt + 1,
      deadline: now + this.leaseMs
    }
    this.leases.set(l.id, l)
    return l
  }

  /** Shard `shard` applied `id`; true when this made the batch done on all `shards`. */
  applied(id: string, shard: number, shards: number): boolean {
    if (this.doneIds.has(id)) return false
    let s = this.appliedBy.get(id)
    if (!s) this.appliedBy.set(id, (s = new Set()))
    s.add(shard)
    if (s.size < shards) return false
    this.appliedBy.delete(id)
    this.leases.delete(id)
    this.doneIds.add(id)
    this.doneCount++
    return true
  }

  isDone = (id: string) => this.doneIds.has(id)

  /** Put a leased batch back (front of the queue); returns it if it was leased. */
  release(id: string): Lease | undefined {
    const l = this.leases.get(id)
    if (!l) return undefined
    this.leases.delete(id)
    if (l.attempt >= this.maxAttempts) this.givenUp.push(id)
    else this.pending.unshift({ epoch: l.epoch, index: l.index, attempt: l.attempt })
    return l
  }

  /** Release every lease past its deadline. */
  expire(now: number): Lease[] {
    const out: Lease[] = []
    // release newest first: each goes to the front, so the oldest ends up served first
    for (const l of [...this.leases.values()].reverse()) if (l.deadline <= now) out.push(this.release(l.id)!)
    return out.reverse()
  }

  /**
   * Release every lease of a worker that left or died, except the batches it already
   * pushed: their gradients wait in the parameter servers (a worker that leaves does not
   * take back what it pushed), and a copy computed by another worker would be refused
   * there as a duplicate. A pushed batch that is never applied (its gradient was refused,
   * or only some shards got it) is re-issued when its lease expires.
   */
  dropWorker(worker: string): Lease[] {
    const out: Lease[] = []
    for (const l of [...this.leases.values()]) if (l.worker === worker && !l.pushed) out.push(this.release(l.id)!)
    return out
  }

  /** The worker pushed the gradient of `id`: extend the lease and keep it if the worker leaves. */
  pushed(id: string, worker: string, now: number): void {
    const l = this.leases.get(id)
    if (l && l.worker === worker) this.leases.set(id, { ...l, deadline: now + this.leaseMs, pushed: true })
  }

  leased = (): ReadonlyArray<Lease> => [...this.leases.values()]
  get epoch() {
    return Math.max(0, this.nextEpoch - 1)
  }
  get outstanding() {
    return this.leases.size
  }
}
