/**
 * Implements: a pipeline stage worker's mailbox reducer — what stage k of replica r does
 * next, as `step(state, event) → effects` over a closed union of events. The shell
 * (stage.ts) turns params bundles, server heartbeats, lease and label replies,
 * activations from stage k−1, activation gradients from stage k+1, push acknowledgements
 * and a Tick into events on one queue, and performs the effects (lease, fetch the labels,
 * run a forward or a backward and send its output, push, pull, release).
 *
 * A step (docs/ARCHITECTURE.md "Pipelines"):
 *  - stage 0 drives it: once it holds M leased batches (the micro-batches) and every shard
 *    it reads is at one version v, it runs their forwards; each stage's output goes to the
 *    next as (v, step id, attempt, micro-batch); the last stage fetches the micro-batch's
 *    targets from the loader, runs forward and backward in one call, and sends the
 *    activation gradient back; a middle stage recomputes its forward from the stashed
 *    input when that gradient arrives (tfjs keeps no tape);
 *  - the order of the ready work is the schedule (stage-run.ts: a run's data, the schedule,
 *    the stash and the step's gradient);
 *  - after its M backwards a stage pushes its own tensors' gradient (the sum over the
 *    micro-batches ÷ the step's rows) to its own shards as the replica (one sender per
 *    replica, so the shards' one synchronous update per step sees every stage's part of
 *    the same gradient); the last stage first sends the tied weights' part to stage 0;
 *  - no progress on a step for `stepTimeoutMs` (a stage died): stage 0 runs it again as
 *    attempt a+1 on the same batches and params; every stage drops what it had of an
 *    older attempt; a push is idempotent at the shards, so nothing is applied twice.
 * Params and restarts follow params-cache.ts; pushes the worker's rules (core.ts). No I/O, no clocks.
 */
import type { PushAck, Rejected } from "../../shared/protocol/messages.ts"
import type { Batch as ModelBatch } from "../../shared/models/model.ts"
import type { Activation } from "../../shared/models/pipeline.ts"
import type { TensorBundle, WireTensor } from "../../shared/wire/tensor.ts"
import { emptyCache, finalState, pullAll, serverSeen, staleLease, takeParams, type ParamsCache, type ParamsIn } from "./params-cache.ts"
import { addGrads, newRun, notePeak, opOf, pickOp, runKey, runOfLeased, stepGradient, type LeasedBatch, type MicroMeta, type OpTarget, type Run } from "./stage-run.ts"

export interface StageConfig {
  /** this process (stage 0: the replica's id). */
  readonly id: string
  /** the replica: the gradient's sender at the shards, the lease owner. */
  readonly replica: string
  readonly job: string
  readonly stage: number
  readonly stages: number
  readonly micros: number
  readonly schedule: "1f1b" | "gpipe"
  /** shards this stage reads params from; shards it pushes to, with their tensors (trainable, in spec order). */
  readonly reads: readonly number[]
  readonly pushes: ReadonlyMap<number, readonly { readonly name: string; readonly shape: readonly number[] }[]>
  /** tied weights this stage reads but another owns (last stage: sends their gradient to stage 0); stage 0: those it receives. */
  readonly tied: readonly { readonly name: string; readonly shape: readonly number[] }[]
  readonly steps: number
  readonly ackTimeoutMs: number
  readonly watchdogMs: number
  readonly stepTimeoutMs: number
}

export interface StagePush {
  readonly key: string
  readonly version: number
  readonly stepId: string
  readonly bundles: ReadonlyMap<number, TensorBundle>
  readonly acked: Set<number>
  /** shards that had its batches applied already (PushAck "applied", or a duplicate). */
  readonly applied: Set<number>
  readonly leased: readonly LeasedBatch[]
  sentAt: number
}

export interface StageState extends ParamsCache {
  readonly cfg: StageConfig
  /** stage 0: batches leased for the next step. */
  held: LeasedBatch[]
  leasing: boolean
  leaseAfter: number
  run?: Run
  computing: boolean
  inflight?: StagePush
  /** stage 0: the params key of the last step started (a step never runs twice on the same params). */
  lastKey?: string
  waitingSince: number
  finished: boolean
  now: number
  lastReport: number
  readonly stats: { steps: number; retries: number; stale: number; dropped: number; pulls: number }
}

export type StageEvent =
  | ({ readonly _tag: "ParamsReceived" } & ParamsIn)
  | { readonly _tag: "PullEnded"; readonly shard: number }
  | { readonly _tag: "ServerSeen"; readonly shard: number; readonly incarnation: number; readonly version: number; readonly id?: string }
  | { readonly _tag: "LeaseReplied"; readonly batch?: LeasedBatch; readonly noBatch?: { retryAfterMs: number }; readonly failed?: string }
  | { readonly _tag: "LabelsReplied"; readonly key: string; readonly micro: number; readonly batch?: ModelBatch; readonly failed?: string }
  | { readonly _tag: "ActivationReceived"; readonly version: number; readonly attempt: number; readonly stepId: string; readonly micro: number; readonly micros: number; readonly meta: MicroMeta; readonly x: Activation }
  | { readonly _tag: "GradientReceived"; readonly version: number; readonly attempt: number; readonly stepId: string; readonly micro: number; readonly dy: Activation; readonly loss: number }
  | { readonly _tag: "TiedReceived"; readonly version: number; readonly attempt: number; readonly stepId: string; readonly grads: ReadonlyMap<string, Float32Array> }
  | { readonly _tag: "ForwardDone"; readonly key: string; readonly micro: number; readonly ms: number }
  | { readonly _tag: "BackwardDone"; readonly key: string; readonly micro: number; readonly ms: number; readonly grads: ReadonlyMap<string, Float32Array>; readonly loss?: number }
  | { readonly _tag: "OpFailed"; readonly key: string; readonly micro: number; readonly reason: string }
  | { readonly _tag: "PushAcked"; readonly ack: PushAck }
  | { readonly _tag: "PushRefused"; readonly rejected: Rejected; readonly shard: number }
  | { readonly _tag: "StopRequested" }
  | { readonly _tag: "Tick"; readonly now: number }

export type StageEffect =
  | { readonly _tag: "Lease" }
  | { readonly _tag: "Release"; readonly batch: LeasedBatch; readonly reason: string }
  | { readonly _tag: "Fetch"; readonly key: string; readonly micro: number; readonly batchId: string }
  | { readonly _tag: "Pull"; readonly shard: number; readonly minVersion: number }
  /** run the stage's forward on `input` and send the output to stage k+1. */
  | { readonly _tag: "Forward"; readonly op: OpTarget; readonly input: ModelBatch | Activation }
  /** run the backward (last stage: forward + backward of the loss) and send dx to stage k−1 (with the loss). */
  | { readonly _tag: "Backward"; readonly op: OpTarget; readonly input: ModelBatch | Activation; readonly batch?: ModelBatch; readonly dy?: Activation; readonly loss?: number }
  /** last stage: the tied weights' summed gradient part, to stage 0. */
  | { readonly _tag: "SendTied"; readonly op: Omit<OpTarget, "micro" | "meta">; readonly grads: ReadonlyMap<string, Float32Array> }
  /**
   * push a step's gradient part to `shard`: the bundle's tensors are f32 and its `meta.codec` is
   * the codec the shard stamped on the version (params-cache.ts); the shell encodes them under it,
   * with the stage's error feedback, once per (shard, version, step), so a resend or a re-run
   * attempt sends the same bytes (stage.ts).
   */
  | { readonly _tag: "Push"; readonly shard: number; readonly bundle: TensorBundle; readonly resend: boolean }
  | { readonly _tag: "Flushed"; readonly run: Run; readonly loss: number; readonly units: number }
  | { readonly _tag: "Finish" }
  /** a params bundle not believed (params-cache.ts): reported on `errors`, naming its sender. */
  | { readonly _tag: "RefuseParams"; readonly shard: number; readonly version: number; readonly sender?: string; readonly messageId?: string; readonly reason: string }
  | { readonly _tag: "Log"; readonly level: "debug" | "info" | "warn"; readonly message: string }

export const initialStage = (cfg: StageConfig, now: number): StageState => ({
  cfg, ...emptyCache(), held: [], leasing: false, leaseAfter: now,
  computing: false, waitingSince: now, finished: false, now, lastReport: now,
  stats: { steps: 0, retries: 0, stale: 0, dropped: 0, pulls: 0 }
})

const isLast = (s: StageState) => s.cfg.stage === s.cfg.stages - 1
const isFirst = (s: StageState) => s.cfg.stage === 0

/** The version every shard this stage reads is at, if they agree. */
export const commonVersion = (s: StageState): number | undefined => {
  if (s.cfg.reads.some((k) => !s.cache.has(k))) return undefined
  const vs = s.cfg.reads.map((k) => s.cache.get(k)!.version)
  return vs.every((v) => v === vs[0]) ? vs[0] : undefined
}

const cacheKey = (s: StageState): string | undefined =>
  s.cfg.reads.every((k) => s.cache.has(k)) ? s.cfg.reads.map((k) => `${s.cache.get(k)!.incarnation}:${s.cache.get(k)!.version}`).join("/") : undefined

/** Drop the step under way (its params are gone, or a newer attempt came); stage 0 hands its batches back. */
const dropRun = (s: StageState, out: StageEffect[], why: string, release: boolean) => {
  const r = s.run
  if (!r) return
  s.run = undefined
  if (r.flushed) return // done with: nothing is lost
  s.stats.dropped++
  s.lastKey = undefined // not pushed: these params may run a step again
  out.push({ _tag: "Log", level: "info", message: `dropping step v${r.version} attempt ${r.attempt} (${r.done.size}/${r.micros.length} backward): ${why}` })
  if (release && isFirst(s)) for (const b of r.leased) out.push({ _tag: "Release", batch: b, reason: why })
}

export const step = (s: StageState, e: StageEvent): StageEffect[] => {
  const out: StageEffect[] = []
  if (s.finished) return out
  switch (e._tag) {
    case "ParamsReceived": {
      const got = takeParams(s, e, s.now, (x) => out.push(x))
      if (got === "stop") break
      if (got === "stale") {
        if (finish(s, out)) return out
        break
      }
      s.waitingSince = s.now
      if (got === "restarted") {
        out.push({ _tag: "Log", level: "info", message: `shard ${e.shard} restarted (incarnation ${e.incarnation}, version ${e.version})` })
        dropRun(s, out, `shard ${e.shard} restarted`, true)
        for (const b of s.held) out.push({ _tag: "Release", batch: b, reason: `shard ${e.shard} restarted` })
        s.held = []
        s.inflight = undefined
        s.lastKey = undefined
      }
      const v = commonVersion(s)
      if (finish(s, out)) return out
      // sync: every shard moved past the version pushed on: it was applied (or superseded)
      if (s.inflight && s.cfg.reads.every((k) => (s.cache.get(k)?.version ?? -1) > s.inflight!.version)) s.inflight = undefined
      // a step whose version is superseded can never be applied: drop it
      if (s.run && v !== undefined && v > s.run.version) dropRun(s, out, `version ${v} superseded it`, true)
      break
    }
    case "PullEnded":
      s.pulling.delete(e.shard)
      break
    case "ServerSeen": {
      const pull = s.cfg.reads.includes(e.shard) ? serverSeen(s, e, s.now) : undefined
      if (pull) out.push(pull)
      if (finish(s, out)) return out
      break
    }
    case "LeaseReplied": {
      s.leasing = false
      if (e.batch) {
        const old = staleLease(s, e.batch.meta.gen, s.now)
        if (old !== undefined) {
          out.push({ _tag: "Release", batch: e.batch, reason: old })
          s.leaseAfter = s.now + 100
        } else {
          // a lease that expired while this stage still had the batch comes back re-issued: one copy
          // (a step of the same batch twice would count it twice); the step under way keeps its own
          const id = e.batch.meta.batchId
          const inRun = s.run !== undefined && !s.run.flushed && s.run.leased.some((b) => b.meta.batchId === id)
          if (!inRun) s.held = [...s.held.filter((b) => b.meta.batchId !== id), e.batch]
        }
      } else if (e.noBatch) s.leaseAfter = s.now + Math.max(50, e.noBatch.retryAfterMs)
      else {
        if (e.failed) out.push({ _tag: "Log", level: "debug", message: `lease: ${e.failed}` })
        s.leaseAfter = s.now + 200
      }
      break
    }
    case "LabelsReplied": {
      const r = s.run
      if (!r || r.key !== e.key) break
      r.fetching.delete(e.micro)
      if (e.batch) r.labels.set(e.micro, e.batch)
      else out.push({ _tag: "Log", level: "warn", message: `labels of ${r.micros[e.micro]?.batchId}: ${e.failed}; asking again` })
      break
    }
    case "ActivationReceived": {
      if (isFirst(s)) break
      const v = commonVersion(s)
      if (v !== undefined && e.version < v) {
        out.push({ _tag: "Log", level: "debug", message: `activation of v${e.version} dropped: at v${v}` })
        break
      }
      if (e.micros !== s.cfg.micros || e.micro >= e.micros) {
        out.push({ _tag: "Log", level: "warn", message: `activation for micro-batch ${e.micro} of ${e.micros} dropped: this job has ${s.cfg.micros} per step` })
        break
      }
      let r = s.run
      const key = runKey(e.version, e.attempt, e.stepId)
      if (r && r.key !== key) {
        if (r.version === e.version && r.stepId === e.stepId && r.attempt > e.attempt) break // a late message of an older attempt
        dropRun(s, out, `step v${e.version} attempt ${e.attempt} arrived`, false)
        r = undefined
      }
      if (!r) r = s.run = newRun(e.version, e.attempt, e.stepId, e.micros, s.now, [])
      r.micros[e.micro] = e.meta
      r.inputs.set(e.micro, e.x)
      r.lastProgress = s.now
      // the last stage's stash: activations held until their forward + backward
      if (isLast(s)) notePeak(r, true)
      if (isLast(s) && !r.labels.has(e.micro) && !r.fetching.has(e.micro)) {
        r.fetching.add(e.micro)
        out.push({ _tag: "Fetch", key: r.key, micro: e.micro, batchId: e.meta.batchId })
      }
      break
    }
    case "GradientReceived": {
      const r = s.run
      if (!r || r.key !== runKey(e.version, e.attempt, e.stepId) || isLast(s)) break
      r.dys.set(e.micro, e.dy)
      r.losses.set(e.micro, e.loss)
      r.lastProgress = s.now
      break
    }
    case "TiedReceived": {
      const r = s.run
      if (!r || r.key !== runKey(e.version, e.attempt, e.stepId) || !isFirst(s)) break
      r.tiedIn = e.grads
      r.lastProgress = s.now
      flush(s, r, out)
      break
    }
    case "ForwardDone": {
      s.computing = false
      const r = s.run
      if (!r || r.key !== e.key) break
      r.forwarded.add(e.micro)
      r.forwardMs += e.ms
      notePeak(r, false)
      break
    }
    case "BackwardDone": {
      s.computing = false
      const r = s.run
      if (!r || r.key !== e.key || r.done.has(e.micro)) break
      r.done.add(e.micro)
      r.backwardMs += e.ms
      r.lastProgress = s.now
      if (e.loss !== undefined) r.losses.set(e.micro, e.loss)
      addGrads(r, e.grads)
      // the input is no longer needed (stage 0 keeps its batches: a retry runs them again)
      if (!isFirst(s)) r.inputs.delete(e.micro)
      r.dys.delete(e.micro)
      r.labels.delete(e.micro)
      flush(s, r, out)
      break
    }
    case "OpFailed": {
      s.computing = false
      const r = s.run
      if (!r || r.key !== e.key) break
      out.push({ _tag: "Log", level: "warn", message: `step v${r.version} micro-batch ${e.micro} (${r.micros[e.micro]?.batchId}) failed: ${e.reason}` })
      dropRun(s, out, `micro-batch ${e.micro} failed: ${e.reason}`, true)
      break
    }
    case "PushAcked": {
      const f = s.inflight
      if (f && e.ack.batchId === f.stepId && e.ack.sender === s.cfg.replica && f.bundles.has(e.ack.shard)) {
        f.acked.add(e.ack.shard)
        if (e.ack.status === "applied") f.applied.add(e.ack.shard)
        if (f.acked.size >= f.bundles.size) settle(s, f)
      }
      break
    }
    case "PushRefused": {
      const r = e.rejected
      const f = s.inflight
      if (!f || !f.bundles.has(e.shard) || (r.step !== undefined && r.step !== f.version)) break
      if (r.code === "duplicate") {
        // another copy of a batch was applied: nothing of ours is lost
        f.acked.add(e.shard)
        f.applied.add(e.shard)
        if (f.acked.size >= f.bundles.size) settle(s, f)
        break
      }
      out.push({ _tag: "Log", level: "warn", message: `shard ${e.shard} refused my push of ${f.stepId} (${r.code}): ${r.reason}` })
      s.inflight = undefined
      s.stats.stale++
      // the params did not move (a refused version): stage 0 may run the next step on them
      if (r.code !== "stale" && r.code !== "conflict" && cacheKey(s) === f.key && s.lastKey === f.key) s.lastKey = undefined
      // stage 0 owns the leases: the batches go back to the loader
      if (isFirst(s)) for (const b of f.leased) out.push({ _tag: "Release", batch: b, reason: `refused (${r.code}): ${r.reason}` })
      break
    }
    case "StopRequested":
      s.finished = true
      out.push({ _tag: "Finish" })
      return out
    case "Tick": {
      s.now = e.now
      tick(s, out)
      break
    }
  }
  next(s, out)
  return out
}

/**
 * A push is over. When every shard had its batches applied already (a re-issued copy of
 * batches another attempt got in) the params will not move for it: stage 0 may run a new
 * step on these params (else it would wait for a version that, with the shards' barrier
 * no longer waiting for it, never comes).
 */
const settle = (s: StageState, f: StagePush) => {
  if (s.inflight === f) s.inflight = undefined
  if (isFirst(s) && f.applied.size >= f.bundles.size && commonVersion(s) === f.version) s.lastKey = undefined
}

const tick = (s: StageState, out: StageEffect[]) => {
  const f = s.inflight
  if (f && s.now - f.sentAt >= s.cfg.ackTimeoutMs) {
    f.sentAt = s.now
    for (const [k, b] of f.bundles) if (!f.acked.has(k)) out.push({ _tag: "Push", shard: k, bundle: b, resend: true })
  }
  const r = s.run
  // the last stage: a micro-batch whose targets could not be fetched is asked for again
  if (r && isLast(s) && !r.flushed) {
    for (const m of r.inputs.keys()) {
      if (r.labels.has(m) || r.fetching.has(m) || r.done.has(m)) continue
      r.fetching.add(m)
      out.push({ _tag: "Fetch", key: r.key, micro: m, batchId: r.micros[m]!.batchId })
    }
  }
  // stage 0: a step that made no progress for stepTimeoutMs runs again (a stage died, or a message was lost)
  if (r && isFirst(s) && !r.flushed && !s.computing && s.now - r.lastProgress >= s.cfg.stepTimeoutMs) {
    s.stats.retries++
    out.push({ _tag: "Log", level: "warn", message: `step v${r.version} attempt ${r.attempt}: no progress for ${Math.round((s.now - r.lastProgress) / 1000)} s (${r.done.size}/${r.micros.length} backward${r.tiedIn || s.cfg.tied.length === 0 ? "" : ", no tied gradient"}); running it again as attempt ${r.attempt + 1}` })
    s.run = runOfLeased(r.version, r.attempt + 1, r.leased, s.now)
  }
  // the watchdog: params the next piece of work needs, missing for too long
  const v = commonVersion(s)
  const active = s.run && !s.run.flushed ? s.run : undefined
  const waiting = active
    ? v === undefined || v < active.version
    : isFirst(s) && s.held.length >= s.cfg.micros && !s.inflight && (v === undefined || cacheKey(s) === s.lastKey)
  if (waiting && s.now - s.waitingSince >= s.cfg.watchdogMs) {
    s.waitingSince = s.now
    out.push(...pullAll(s, s.cfg.reads))
  }
  if (s.now - s.lastReport >= 10_000) {
    s.lastReport = s.now
    out.push({ _tag: "Log", level: "info", message: `state: cache ${cacheKey(s) ?? "incomplete"}, step ${r ? `v${r.version} attempt ${r.attempt}: ${r.forwarded.size} forward, ${r.done.size} backward of ${r.micros.length}` : "none"}, held ${s.held.length}, in flight ${s.inflight ? `${s.inflight.stepId} acked by [${[...s.inflight.acked]}]` : "none"}, steps ${s.stats.steps}` })
  }
}

/** The job's last version on every shard read, confirmed by their servers (params-cache.ts finalState): finish. */
const finish = (s: StageState, out: StageEffect[]): boolean => {
  const f = finalState(s, s.cfg.reads, s.cfg.steps)
  out.push(...f.pulls)
  if (!f.done) return false
  s.finished = true
  out.push({ _tag: "Finish" })
  return true
}

/** After the step's last backward (and, on stage 0, the tied part): push to the own shards. */
const flush = (s: StageState, r: Run, out: StageEffect[]) => {
  if (r.flushed || r.done.size < r.micros.length) return
  if (isFirst(s) && s.cfg.tied.length > 0 && !r.tiedIn) return
  r.flushed = true
  const { acc, rows, units, loss } = stepGradient(r, [...s.cfg.pushes.values()].flat().map((sp) => sp.name))
  if (isLast(s) && s.cfg.tied.length > 0) {
    out.push({ _tag: "SendTied", op: { key: r.key, version: r.version, attempt: r.attempt, stepId: r.stepId, micros: r.micros.length }, grads: new Map(s.cfg.tied.map((t) => [t.name, acc.get(t.name)!])) })
  }
  const first = (r.micros as MicroMeta[])[0]
  const bundles = new Map<number, TensorBundle>()
  for (const [k, specs] of s.cfg.pushes) {
    const tensors: WireTensor[] = specs.map((sp) => ({ name: sp.name, dtype: "float32", shape: sp.shape, data: acc.get(sp.name)! }))
    bundles.set(k, {
      tensors,
      meta: {
        kind: "grads", job: s.cfg.job, version: r.version, step: r.version, sender: s.cfg.replica, batchId: r.stepId, codec: s.cache.get(k)?.codec ?? "f32",
        extra: { samples: rows, tokens: units, loss, normSq: 0, micro: r.stepId, gen: first.gen, epochBatches: first.epochBatches, incarnation: s.cache.get(k)!.incarnation }
      }
    })
  }
  s.stats.steps++
  if (bundles.size > 0) {
    s.inflight = { key: r.key, version: r.version, stepId: r.stepId, bundles, acked: new Set(), applied: new Set(), leased: r.leased, sentAt: s.now }
    for (const [k, b] of bundles) out.push({ _tag: "Push", shard: k, bundle: b, resend: false })
  }
  // after the pushes: the step's report carries what they sent
  out.push({ _tag: "Flushed", run: r, loss, units })
}

/** The next piece of work: start a step (stage 0), or the schedule's next forward or backward. */
const next = (s: StageState, out: StageEffect[]) => {
  if (s.finished || s.computing) return
  const v = commonVersion(s)
  if (isFirst(s)) {
    const key = cacheKey(s)
    if ((!s.run || s.run.flushed) && !s.inflight && v !== undefined && v < s.cfg.steps && key !== undefined && key !== s.lastKey && s.held.length >= s.cfg.micros) {
      s.run = runOfLeased(v, 0, s.held.splice(0, s.cfg.micros), s.now)
      s.lastKey = key
    }
    if (!s.leasing && s.held.length < s.cfg.micros && s.now >= s.leaseAfter) {
      s.leasing = true
      out.push({ _tag: "Lease" })
    }
  }
  const r = s.run
  if (!r || r.flushed || v === undefined || v !== r.version) return
  const pick = pickOp(r, s.cfg)
  if (pick?.kind === "F") {
    s.computing = true
    out.push({ _tag: "Forward", op: opOf(r, pick.micro), input: r.inputs.get(pick.micro)! })
  } else if (pick?.kind === "B") {
    s.computing = true
    const m = pick.micro
    out.push({ _tag: "Backward", op: opOf(r, m), input: r.inputs.get(m)!, batch: isLast(s) ? r.labels.get(m) : undefined, dy: r.dys.get(m), loss: r.losses.get(m) })
  }
}
