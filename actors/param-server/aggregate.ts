/**
 * Implements: the parameter server's arithmetic core for one shard of tensors — gradient
 * admission, the held gradients, aggregation, clipping and the optimizer step, and the
 * applied log (which micro-batches this shard has applied, exactly once).
 *
 * Consistency:
 *   sync      version v+1 = v updated with the sample-weighted mean of the gradients of the
 *             senders the caller chose (core.ts decides: the barrier, and with several
 *             shards the senders every shard holds); one gradient per sender per version;
 *   bounded s each gradient computed on v-s..v is applied on its own, in arrival order;
 *   async     each gradient is applied on its own, in arrival order, whatever its version.
 * Sums run in sender-id order (float64), so a run is reproducible. A micro-batch id is
 * applied at most once: it is refused once in the applied log, and when two senders hold
 * the same one, only the first chosen is used. A resend of a held or applied gradient is
 * acknowledged again (`already`), so a worker may resend until it hears back.
 * Non-finite gradients, wrong tensor sets or shapes are rejected with a reason and never
 * touch the params. A step is all or nothing: what it changes is saved first (snapshot.ts)
 * and put back when the new params or optimizer slots are not all finite (an overflow: a
 * huge LR or gradient, momentum adding up — a slot that overflowed would poison every
 * later step); the step is then refused (`applyChecked`) — or, for a
 * shard of a coordinated sync job whose peers apply the same version, the version is
 * made with this shard's params kept (`keep`). No I/O and no clocks: core.ts drives it.
 */
import { allFinite, findNonFinite } from "../../shared/optim/clip.ts"
import { makeOptimizer, type Optimizer, type OptimizerConfig, type OptimizerSlots } from "../../shared/optim/optimizers.ts"
import type { Consistency } from "../../shared/config/job.ts"
import { AppliedLog, parseBatchId, type BatchRef } from "../../shared/protocol/applied-log.ts"
import type { ErrorCode } from "../../shared/protocol/messages.ts"
import type { Spec } from "../../shared/protocol/sharding.ts"
import { StepSnapshot } from "./snapshot.ts"

export interface GradientPush {
  readonly sender: string
  /** the params version the gradient was computed on. */
  readonly version: number
  /** micro-batch ids joined by "+" (one id without accumulation). */
  readonly batchId: string
  readonly samples: number
  readonly tokens: number
  readonly loss: number
  readonly grads: ReadonlyMap<string, Float32Array>
  /** batches in an epoch (lets the applied log compact full epochs); 0 = unknown. */
  readonly epochBatches?: number
  /** squared norm of the sender's whole gradient (all shards), for async clipping; -1 = unknown. */
  readonly normSq?: number
}

export type Held = GradientPush & { readonly staleness: number; readonly micro: readonly BatchRef[] }

export type Admission =
  | { readonly ok: true; readonly staleness: number; readonly already?: "held" | "applied" }
  | { readonly ok: false; readonly code: ErrorCode; readonly reason: string }

/** What `applyChecked` did: a new version (`kept`: with this shard's params unchanged), or nothing (`refused`). */
export type ApplyResult =
  | { readonly step: AppliedStep; readonly dropped: Held[]; readonly kept?: string; readonly refused?: undefined }
  | { readonly step?: undefined; readonly refused: { readonly reason: string; readonly pushes: readonly Held[] } }

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

/** The slot holding the last raw gradient applied (bounded/async delay compensation). */
export const PREV_GRAD = "async_prev_grad"

/** Most gradients held at once in bounded/async mode (more are refused `over-budget`: resent later). */
export const MAX_HELD = 64

const numel = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1)
const bySender = (a: { sender: string }, b: { sender: string }) => (a.sender < b.sender ? -1 : a.sender > b.sender ? 1 : 0)

export class ShardState {
  /** every tensor of this shard (params). */
  readonly specs: readonly Spec[]
  /** the ones trained (not frozen): they take gradients and hold optimizer state. */
  readonly trained: readonly Spec[]
  readonly params: Map<string, Float32Array>
  slots: Map<string, OptimizerSlots>
  optimizer: Optimizer
  consistency: Consistency
  clipNorm: number
  version: number
  /** per tensor update count (Adam's bias correction). */
  updates: number
  readonly log: AppliedLog
  /** held gradients in arrival order (sync: at most one per sender, all of the open version). */
  private held: Held[] = []
  /** what a step changes, saved before it (undone when its result is not finite). */
  private readonly snapshot = new StepSnapshot(PREV_GRAD)
  /** the trained params (the ones a step changes), for the finite check. */
  private readonly trainedParams: ReadonlyMap<string, Float32Array>
  private readonly trainedNames: ReadonlyArray<string>

  constructor(o: {
    specs: readonly Spec[]
    params: Map<string, Float32Array>
    optimizer: OptimizerConfig
    consistency: Consistency
    clipNorm: number
    version?: number
    updates?: number
    slots?: Map<string, OptimizerSlots>
    log?: AppliedLog
    /** names of the tensors that are trained (default: all); the others are frozen. */
    trainable?: ReadonlySet<string>
  }) {
    this.specs = o.specs
    this.trained = o.trainable ? o.specs.filter((s) => o.trainable!.has(s.name)) : o.specs
    this.params = o.params
    this.optimizer = makeOptimizer(o.optimizer)
    this.consistency = o.consistency
    this.clipNorm = o.clipNorm
    this.version = o.version ?? 0
    this.updates = o.updates ?? 0
    this.slots = o.slots ?? new Map(this.trained.map((s) => [s.name, this.optimizer.initState(numel(s.shape))]))
    this.log = o.log ?? new AppliedLog()
    for (const s of o.specs) {
      const p = o.params.get(s.name)
      if (!p || p.length !== numel(s.shape)) throw new RangeError(`param ${s.name}: expected ${numel(s.shape)} elements, got ${p?.length}`)
    }
    this.trainedParams = new Map(this.trained.map((s) => [s.name, o.params.get(s.name)!]))
    this.trainedNames = this.trained.map((s) => s.name)
  }

  isApplied = (batchId: string) => this.log.hasId(batchId)
  /** Senders with a gradient held now, sorted. */
  heldSenders = (): string[] => [...new Set(this.held.map((h) => h.sender))].sort()
  heldList = (): ReadonlyArray<Held> => this.held
  get heldCount() {
    return this.held.length
  }

  /**
   * Validate and hold a gradient (or acknowledge a resend of one held or applied). Sync: a
   * sender's new batch for the open version replaces its held one (its process restarted,
   * or it gave that batch up) unless `locked` says the held one is already chosen.
   */
  admit(p: GradientPush, locked: (h: Held) => boolean = () => false): Admission {
    const micro: BatchRef[] = []
    for (const id of p.batchId.split("+")) {
      const r = parseBatchId(id)
      if (!r) return { ok: false, code: "bad-message", reason: `batch id ${JSON.stringify(id)} is not of the form e<epoch>-b<index>` }
      micro.push(r)
    }
    const applied = micro.filter((r) => this.log.has(r))
    if (applied.length === micro.length) return { ok: true, staleness: 0, already: "applied" }
    if (applied.length > 0) return { ok: false, code: "duplicate", reason: `batch e${applied[0].epoch}-b${applied[0].index} was already applied` }
    const same = this.held.find((h) => h.sender === p.sender && h.batchId === p.batchId)
    if (same) return { ok: true, staleness: same.staleness, already: "held" }
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
    for (const s of this.trained) {
      const g = p.grads.get(s.name)
      if (!g) return { ok: false, code: "bad-tensor", reason: `gradient for ${s.name} is missing` }
      if (g.length !== numel(s.shape)) {
        return { ok: false, code: "bad-tensor", reason: `gradient ${s.name} has ${g.length} elements, expected ${numel(s.shape)} (shape [${s.shape}])` }
      }
    }
    if (p.grads.size !== this.trained.length) {
      const extra = [...p.grads.keys()].filter((n) => !this.trained.some((s) => s.name === n))
      const frozen = extra.filter((n) => this.specs.some((s) => s.name === n))
      return { ok: false, code: "bad-tensor", reason: frozen.length > 0 ? `tensors frozen in this job (train.freeze / train.lora): ${frozen.join(", ")}` : `tensors not owned by this shard: ${extra.join(", ")}` }
    }
    const bad = findNonFinite(p.grads)
    if (bad) return { ok: false, code: "non-finite", reason: `gradient ${bad.name}[${bad.index}] is ${bad.value}` }
    const mine = c.mode === "sync" ? this.held.find((h) => h.sender === p.sender) : undefined
    if (mine && locked(mine)) {
      return { ok: false, code: "conflict", reason: `${p.sender}'s gradient of ${mine.batchId} is already chosen for version ${this.version + 1}` }
    }
    if (mine) this.held = this.held.filter((h) => h !== mine)
    if (this.held.length >= MAX_HELD) return { ok: false, code: "conflict", reason: `over budget: ${this.held.length} gradients held; resend later` }
    this.held.push({ ...p, staleness, micro })
    return { ok: true, staleness }
  }

  /** Drop every held gradient of `sender` (it left before the barrier chose it). */
  forget(sender: string): void {
    this.held = this.held.filter((h) => h.sender !== sender)
  }

  /**
   * The gradients a sync version would use from `senders` (sorted; a micro-batch held by
   * two senders goes to the first), and each chosen one's share of the samples.
   */
  choose(senders: readonly string[]): Held[] {
    const want = new Set(senders)
    const seen = new Set<string>()
    const out: Held[] = []
    for (const h of [...this.held].filter((h) => want.has(h.sender)).sort(bySender)) {
      const ids = h.batchId.split("+")
      if (ids.some((id) => seen.has(id))) continue
      for (const id of ids) seen.add(id)
      out.push(h)
    }
    return out
  }

  /** The sample-weighted mean of `pushes` (float64, sender order) and its squared norm. */
  aggregate(pushes: readonly Held[]): { agg: Map<string, Float32Array>; sumSq: number } {
    const samples = pushes.reduce((n, p) => n + p.samples, 0)
    const agg = new Map<string, Float32Array>()
    let sumSq = 0
    for (const s of this.trained) {
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
      for (let i = 0; i < out.length; i++) sumSq += out[i] * out[i]
      agg.set(s.name, out)
    }
    return { agg, sumSq }
  }

  /**
   * Apply `pushes` (from `choose`, or the oldest held one in bounded/async): aggregate, clip
   * by the global norm (`globalSumSq` = the squared norm over every shard when known, else
   * this shard's own), optimizer step with `lr`, version + 1, record the micro-batches.
   * Sync: every other held gradient is dropped (returned in `dropped`), as it is stale now.
   * Throws when the step's params are not finite (nothing changed): see `applyChecked`.
   */
  apply(lr: number, pushes: readonly Held[], globalSumSq?: number): { step: AppliedStep; dropped: Held[]; kept?: string } {
    const r = this.applyChecked(lr, pushes, globalSumSq, "refuse")
    if (r.refused) throw new RangeError(r.refused.reason)
    return r
  }

  /**
   * `apply`, all or nothing: when the new params or slots are not all finite, the params and slots
   * are put back as they were, and with `refuse` the step is not made (the version stays,
   * `pushes` are no longer held: the caller refuses them; sync: the others stay held, they
   * are still of the open version); with `keep` the version is made with this shard's
   * params unchanged (`kept` says why).
   */
  applyChecked(lr: number, pushes: readonly Held[], globalSumSq: number | undefined, onNonFinite: "refuse" | "keep"): ApplyResult {
    if (pushes.length === 0) throw new RangeError("apply: no gradients")
    const { agg, sumSq } = this.aggregate(pushes)
    const names = this.trainedNames
    this.snapshot.save(names, this.params, this.slots)
    const ratio = this.compensateDelay(agg, pushes)
    const norm = Math.sqrt((globalSumSq ?? sumSq) * ratio)
    if (this.clipNorm > 0) {
      const scale = this.clipNorm / (norm + 1e-6)
      if (Number.isFinite(norm) && scale < 1) for (const g of agg.values()) for (let i = 0; i < g.length; i++) g[i] *= scale
    }
    this.updates++
    for (const s of this.trained) this.optimizer.update(this.params.get(s.name)!, agg.get(s.name)!, this.slots.get(s.name)!, lr, this.updates)
    const bad = findNonFinite(this.trainedParams) ?? this.nonFiniteSlot()
    let kept: string | undefined
    if (bad) {
      this.snapshot.restore(names, this.params, this.slots)
      this.updates--
      const reason = `the step to version ${this.version + 1} made ${bad.name}[${bad.index}] ${bad.value} (lr ${lr}, ${pushes.length} gradient${pushes.length === 1 ? "" : "s"}, norm ${norm})`
      if (onNonFinite === "refuse") {
        const chosen = new Set(pushes)
        this.held = this.held.filter((h) => !chosen.has(h))
        return { refused: { reason, pushes } }
      }
      kept = reason
    }
    this.version++
    const chosen = new Set(pushes)
    let dropped: Held[] = []
    if (this.consistency.mode === "sync") {
      dropped = this.held.filter((h) => !chosen.has(h))
      this.held = []
    } else {
      this.held = this.held.filter((h) => !chosen.has(h))
      // bounded: what the new version made too stale goes too
      const c = this.consistency
      if (c.mode === "bounded") {
        dropped = this.held.filter((h) => this.version - h.version > c.staleness)
        this.held = this.held.filter((h) => this.version - h.version <= c.staleness)
      }
    }
    const samples = pushes.reduce((n, p) => n + p.samples, 0)
    for (const p of pushes) for (const r of p.micro) this.log.add(r, p.epochBatches ?? 0)
    return {
      step: {
        version: this.version,
        batchIds: pushes.flatMap((p) => p.batchId.split("+")),
        contributors: pushes.map((p) => p.sender),
        samples,
        tokens: pushes.reduce((n, p) => n + p.tokens, 0),
        loss: pushes.reduce((n, p) => n + (p.loss * p.samples) / samples, 0),
        lr,
        gradNorm: norm,
        maxStaleness: pushes.reduce((m, p) => Math.max(m, this.version - 1 - p.version), 0)
      },
      dropped,
      ...(kept !== undefined ? { kept } : {})
    }
  }

  /**
   * Bounded/async: one step of delay compensation. A gradient computed on version v − 1 and
   * applied to v (staleness ≥ 1, the rule with 2 workers) is replaced by the linear
   * extrapolation 2·g − g_prev, g_prev being the raw gradient this shard applied last: to
   * first order the gradient at v. Without it a delay of one step stalls Adam on this
   * project's default model near validation loss 3.1 (a one-step delay cuts the stable step
   * size of a momentum method from 2(1+β)/(1−β) to about 1, whatever β: docs/RELIABILITY.md);
   * with it async ends within ~3% of sync. g_prev lives in the optimizer slots
   * (`async_prev_grad`), so checkpoints keep it. Returns ‖ĝ‖²/‖g‖² of this shard, by which
   * a norm measured on the raw gradient (the worker's, over every shard) is scaled for clipping.
   */
  private compensateDelay(agg: Map<string, Float32Array>, pushes: readonly Held[]): number {
    if (this.consistency.mode === "sync") {
      for (const sl of this.slots.values()) delete sl[PREV_GRAD]
      return 1
    }
    const stale = this.version - pushes[0].version >= 1
    let rawSq = 0
    let extSq = 0
    for (const sp of this.trained) {
      const g = agg.get(sp.name)!
      const sl = this.slots.get(sp.name)!
      const prev = sl[PREV_GRAD]
      const raw = Float32Array.from(g)
      if (stale && prev !== undefined && prev.length === g.length) for (let i = 0; i < g.length; i++) g[i] = 2 * raw[i] - prev[i]
      sl[PREV_GRAD] = raw
      for (let i = 0; i < g.length; i++) {
        rawSq += raw[i] * raw[i]
        extSq += g[i] * g[i]
      }
    }
    return rawSq > 0 ? extSq / rawSq : 1
  }

  /** The first non-finite element of the optimizer state a step changes, named `<tensor>.<slot>` (the delay compensation's copy of a finite gradient aside). */
  private nonFiniteSlot() {
    for (const name of this.trainedNames) {
      for (const [k, a] of Object.entries(this.slots.get(name)!)) {
        if (k === PREV_GRAD || allFinite(a)) continue
        return findNonFinite(new Map([[`${name}.${k}`, a]]))
      }
    }
    return undefined
  }

  /** Bounded/async: the oldest held gradient. */
  next(): Held | undefined {
    return this.held[0]
  }
}
