/**
 * Implements: the parameter server's pure core — gradient admission, aggregation and
 * the optimizer step for one shard of tensors.
 *
 * Consistency:
 *   sync      version v+1 = v updated with the sample-weighted mean of the gradients of
 *             every member of v's barrier (the live workers when v was published, plus
 *             any other worker whose v-gradient arrives before the barrier closes);
 *   bounded s each gradient computed on v-s..v is applied as it arrives;
 *   async     each gradient is applied as it arrives, whatever its version.
 * Sums run in a fixed order (sender id) so a run is reproducible. A gradient is applied
 * at most once: a batch id already applied is a duplicate. Non-finite gradients, wrong
 * tensor sets or shapes are rejected with a reason and never touch the params.
 * No I/O and no clocks: the server (server.ts) feeds it and publishes what it returns.
 */
import { clipByGlobalNorm, findNonFinite, globalNorm } from "../../shared/optim/clip.ts"
import { makeOptimizer, type Optimizer, type OptimizerConfig, type OptimizerSlots } from "../../shared/optim/optimizers.ts"
import type { Consistency } from "../../shared/config/job.ts"
import type { ErrorCode } from "../../shared/protocol/messages.ts"
import type { Spec } from "../../shared/protocol/sharding.ts"

export interface GradientPush {
  readonly sender: string
  /** the params version the gradient was computed on. */
  readonly version: number
  readonly batchId: string
  readonly samples: number
  readonly tokens: number
  readonly loss: number
  readonly grads: ReadonlyMap<string, Float32Array>
}

export type Admission =
  | { readonly ok: true; readonly staleness: number }
  | { readonly ok: false; readonly code: ErrorCode; readonly reason: string }

export interface AppliedStep {
  readonly version: number
  readonly batchIds: string[]
  readonly contributors: string[]
  readonly samples: number
  readonly tokens: number
  readonly loss: number
  readonly lr: number
  readonly gradNorm: number
  readonly maxStaleness: number
}

const numel = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1)

export class ShardState {
  readonly specs: readonly Spec[]
  readonly params: Map<string, Float32Array>
  slots: Map<string, OptimizerSlots>
  optimizer: Optimizer
  consistency: Consistency
  clipNorm: number
  version: number
  /** per tensor update count (Adam's bias correction). */
  updates: number
  private readonly appliedBatches = new Set<string>()
  /** sync: gradients of the open version, by sender. */
  private pending = new Map<string, GradientPush & { staleness: number }>()
  /** sync: who the open version waits for. */
  private barrier = new Set<string>()
  /** sync, shards > 1: this shard follows shard 0's choice of senders per version. */
  private following = false
  private readonly decisions = new Map<number, readonly string[]>()
  /** gradients the last `apply` held but did not use (a follower's non-chosen senders). */
  dropped: Array<GradientPush> = []

  constructor(o: {
    specs: readonly Spec[]
    params: Map<string, Float32Array>
    optimizer: OptimizerConfig
    consistency: Consistency
    clipNorm: number
    version?: number
    updates?: number
    slots?: Map<string, OptimizerSlots>
    appliedBatches?: Iterable<string>
  }) {
    this.specs = o.specs
    this.params = o.params
    this.optimizer = makeOptimizer(o.optimizer)
    this.consistency = o.consistency
    this.clipNorm = o.clipNorm
    this.version = o.version ?? 0
    this.updates = o.updates ?? 0
    this.slots = o.slots ?? new Map(o.specs.map((s) => [s.name, this.optimizer.initState(numel(s.shape))]))
    for (const b of o.appliedBatches ?? []) this.appliedBatches.add(b)
    for (const s of o.specs) {
      const p = o.params.get(s.name)
      if (!p || p.length !== numel(s.shape)) throw new RangeError(`param ${s.name}: expected ${numel(s.shape)} elements, got ${p?.length}`)
    }
  }

  /** Batch ids applied so far (for checkpoints and tests). */
  applied = (): string[] => [...this.appliedBatches]
  isApplied = (batchId: string) => this.appliedBatches.has(batchId)

  /** Open the barrier of the current version over these live workers (sync). */
  openBarrier(members: readonly string[]): void {
    this.barrier = new Set(members)
  }

  /** A member left: it no longer holds the barrier (its pending gradient, if any, stays). */
  dropMember(id: string): void {
    this.barrier.delete(id)
  }

  waitingFor = (): string[] => [...this.barrier].filter((m) => !this.pending.has(m)).sort()

  /** Validate and admit a gradient. In sync mode it is held until the barrier closes. */
  admit(p: GradientPush): Admission {
    const a = this.check(p)
    // Sync: a worker whose gradient for the open version is refused (a duplicate batch, a
    // bad tensor) does not push another one for this version: it waits for the next. So
    // the barrier stops waiting for it, or one refused push would stall the shard and
    // every worker forever. (Seen over NATS: a batch re-issued while its first copy was
    // still pending here, then refused as a duplicate.) A sender that already has a
    // gradient pending keeps its place.
    if (!a.ok && this.consistency.mode === "sync" && p.version === this.version && !this.pending.has(p.sender)) {
      this.barrier.delete(p.sender)
    }
    return a
  }

  private check(p: GradientPush): Admission {
    // an accumulated gradient (train.accumulate > 1) names its micro-batches: `e0-b1+e0-b7`
    const done = p.batchId.split("+").find((b) => this.appliedBatches.has(b))
    if (done !== undefined) {
      return { ok: false, code: "duplicate", reason: `batch ${done} was already applied` }
    }
    if (!(p.samples > 0)) return { ok: false, code: "invalid-value", reason: `samples must be > 0, got ${p.samples}` }
    if (p.version > this.version) {
      return { ok: false, code: "invalid-value", reason: `version ${p.version} is from the future (current ${this.version})` }
    }
    const staleness = this.version - p.version
    const c = this.consistency
    if (c.mode === "sync" && staleness > 0) {
      return { ok: false, code: "stale", reason: `gradient of version ${p.version}, the shard is at ${this.version} (sync)` }
    }
    if (c.mode === "bounded" && staleness > c.staleness) {
      return { ok: false, code: "stale", reason: `staleness ${staleness} > bound ${c.staleness}` }
    }
    for (const s of this.specs) {
      const g = p.grads.get(s.name)
      if (!g) return { ok: false, code: "bad-tensor", reason: `gradient for ${s.name} is missing` }
      if (g.length !== numel(s.shape)) {
        return { ok: false, code: "bad-tensor", reason: `gradient ${s.name} has ${g.length} elements, expected ${numel(s.shape)} (shape [${s.shape}])` }
      }
    }
    if (p.grads.size !== this.specs.length) {
      const extra = [...p.grads.keys()].filter((n) => !this.specs.some((s) => s.name === n))
      return { ok: false, code: "bad-tensor", reason: `tensors not owned by this shard: ${extra.join(", ")}` }
    }
    const bad = findNonFinite(p.grads)
    if (bad) {
      return { ok: false, code: "non-finite", reason: `gradient ${bad.name}[${bad.index}] is ${bad.value}` }
    }
    if (c.mode === "sync") {
      if (this.pending.has(p.sender)) {
        return { ok: false, code: "duplicate", reason: `${p.sender} already pushed a gradient for version ${this.version}` }
      }
      if ([...this.pending.values()].some((q) => q.batchId === p.batchId)) {
        return { ok: false, code: "duplicate", reason: `batch ${p.batchId} is already pending in version ${this.version}` }
      }
      this.pending.set(p.sender, { ...p, staleness })
    } else {
      this.pending = new Map([[p.sender, { ...p, staleness }]])
    }
    return { ok: true, staleness }
  }

  /** Sync: every barrier member pushed (and at least one gradient is held). Else: anything held. */
  ready(): boolean {
    if (this.pending.size === 0) return false
    if (this.consistency.mode !== "sync") return true
    if (this.following) {
      const d = this.decisions.get(this.version + 1)
      return d !== undefined && d.every((sender) => this.pending.has(sender))
    }
    for (const m of this.barrier) if (!this.pending.has(m)) return false
    return true
  }

  /**
   * Sync with several shards: shard 0 leads, the others follow. A follower applies to
   * version v+1 exactly the senders shard 0 applied to its v+1 (from its StepApplied),
   * so every shard agrees on each version's batches even when a worker joins or leaves
   * between two shards' decisions. Gradients from other senders are dropped as stale.
   */
  follow(): void {
    this.following = true
  }

  /** Shard 0 applied `contributors` to `version`. */
  decided(version: number, contributors: readonly string[]): void {
    if (version <= this.version) return
    this.decisions.set(version, contributors)
    for (const v of this.decisions.keys()) if (v <= this.version) this.decisions.delete(v)
  }


  /**
   * Aggregate the held gradients (sample-weighted mean, summed in sender order), clip,
   * apply the optimizer with `lr`, advance the version. Call only when `ready()`.
   */
  apply(lr: number): AppliedStep {
    const decided = this.following && this.consistency.mode === "sync" ? this.decisions.get(this.version + 1) : undefined
    const held = [...this.pending.values()]
    const pushes = (decided ? held.filter((p) => decided.includes(p.sender)) : held).sort((a, b) => (a.sender < b.sender ? -1 : a.sender > b.sender ? 1 : 0))
    this.dropped = decided ? held.filter((p) => !decided.includes(p.sender)) : []
    this.pending = new Map()
    const samples = pushes.reduce((n, p) => n + p.samples, 0)
    const agg = new Map<string, Float32Array>()
    for (const s of this.specs) {
      const out = new Float32Array(numel(s.shape))
      if (pushes.length === 1) out.set(pushes[0].grads.get(s.name)!)
      else {
        const acc = new Float64Array(out.length)
        for (const p of pushes) {
          const w = p.samples / samples
          const g = p.grads.get(s.name)!
          for (let i = 0; i < g.length; i++) acc[i] += w * g[i]
        }
        for (let i = 0; i < out.length; i++) out[i] = acc[i]
      }
      agg.set(s.name, out)
    }
    const gradNorm = this.clipNorm > 0 ? clipByGlobalNorm(agg.values(), this.clipNorm).norm : globalNorm(agg.values())
    this.updates++
    for (const s of this.specs) {
      this.optimizer.update(this.params.get(s.name)!, agg.get(s.name)!, this.slots.get(s.name)!, lr, this.updates)
    }
    this.version++
    const batchIds = pushes.flatMap((p) => p.batchId.split("+"))
    for (const b of batchIds) this.appliedBatches.add(b)
    return {
      version: this.version,
      batchIds,
      contributors: pushes.map((p) => p.sender),
      samples,
      tokens: pushes.reduce((n, p) => n + p.tokens, 0),
      loss: pushes.reduce((n, p) => n + (p.loss * p.samples) / samples, 0),
      lr,
      gradNorm,
      maxStaleness: pushes.reduce((m, p) => Math.max(m, p.staleness), 0)
    }
  }
}
