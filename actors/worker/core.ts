/**
 * Implements: the training worker's mailbox reducer — what a worker does next, as a pure
 * function `step(state, event) → effects` over a closed union of events. The shell
 * (worker.ts) turns lease replies, params bundles, push acknowledgements and refusals,
 * parameter-server heartbeats, control commands, the end of a computation and a Tick into
 * events on one queue, and performs the effects (lease, compute, push, pull, release).
 *
 * The rules it keeps (docs/RELIABILITY.md):
 *  - params: the cache rules of params-cache.ts (newer versions, restarts, pulls, the
 *    lease-generation grace, which broadcasts are believed, and that the last version ends
 *    the worker only once its servers confirm it); a restart drops the batches held and the push in flight (the
 *    loader rebuilds its table on the same restart), so a resumed job re-serves exactly the
 *    batches after the checkpoint;
 *  - compute when `accumulate` batches are held, no push is in flight, every shard is
 *    cached and the params differ from the last ones computed on (sync: all shards at
 *    one version): a worker never pushes twice on the same params;
 *  - a push is in flight until every shard acknowledged it (PushAck); unacknowledged
 *    shards get the same bundle again every ackTimeoutMs (the server's admission is
 *    idempotent); a refusal ends it (stale: the batches go back to the loader);
 *  - the watchdog: waiting for params longer than watchdogMs pulls every shard (a lost
 *    broadcast never stalls a worker).
 * No I/O, no clocks (time arrives in events).
 */
import type { BatchLeased, PushAck, Rejected } from "../../shared/protocol/messages.ts"
import type { TensorBundle } from "../../shared/wire/tensor.ts"
import type { Batch as ModelBatch } from "../../shared/models/model.ts"
import { emptyCache, finalState, pullAll, serverSeen, staleLease, takeParams, type ParamsCache, type ParamsIn } from "./params-cache.ts"

/** A leased batch: the loader's meta and the model's named tensors (shared/models/model.ts). */
export interface Batch {
  readonly meta: BatchLeased
  readonly data: ModelBatch
}


export interface WorkerConfig {
  readonly id: string
  readonly shards: number
  readonly steps: number
  readonly accumulate: number
  readonly ackTimeoutMs: number
  readonly watchdogMs: number
}

export interface InFlight {
  /** the cache key the gradient was computed on. */
  readonly key: string
  readonly versions: ReadonlyMap<number, number>
  readonly batchId: string
  readonly micro: readonly Batch[]
  readonly bundles: ReadonlyMap<number, TensorBundle>
  /** shards that admitted it (PushAck held or applied). */
  readonly acked: Set<number>
  /** bounded/async: shards that applied it (PushAck applied). */
  readonly applied: Set<number>
  sentAt: number
  attempts: number
}

export interface WorkerState extends ParamsCache {
  readonly cfg: WorkerConfig
  consistency: "sync" | "bounded" | "async"
  held: Batch[]
  leasing: boolean
  /** no lease request before this time (a NoBatch's retryAfterMs). */
  leaseAfter: number
  computing: boolean
  inflight?: InFlight
  /** the last pushes that ended (at most 2): a refusal that comes after their ack still finds them. */
  recent: InFlight[]
  /** the cache key of the last gradient computed. */
  lastKey?: string
  /** since when the worker has been ready but for params. */
  waitingSince: number
  finished: boolean
  now: number
  /** when the worker last computed or logged its state (after 10 s without a step it says why). */
  lastReport: number
  readonly stats: { steps: number; stale: number; resent: number; pulls: number }
}

export type WorkerEvent =
  | { readonly _tag: "LeaseReplied"; readonly batch?: Batch; readonly noBatch?: { reason: string; retryAfterMs: number }; readonly failed?: string }
  | ({ readonly _tag: "ParamsReceived" } & ParamsIn)
  | { readonly _tag: "PullEnded"; readonly shard: number }
  | { readonly _tag: "ServerSeen"; readonly shard: number; readonly incarnation: number; readonly version: number; readonly id?: string }
  | { readonly _tag: "PushAcked"; readonly ack: PushAck }
  | { readonly _tag: "PushRefused"; readonly rejected: Rejected; readonly shard: number }
  | { readonly _tag: "Computed"; readonly key: string; readonly versions: ReadonlyMap<number, number>; readonly micro: readonly Batch[]; readonly batchId: string; readonly bundles: ReadonlyMap<number, TensorBundle> }
  | { readonly _tag: "StopRequested" }
  | { readonly _tag: "ConsistencyChanged"; readonly mode: "sync" | "bounded" | "async" }
  | { readonly _tag: "Tick"; readonly now: number }

export type WorkerEffect =
  | { readonly _tag: "Lease" }
  | { readonly _tag: "Compute"; readonly key: string; readonly versions: ReadonlyMap<number, number>; readonly micro: readonly Batch[] }
  | { readonly _tag: "Push"; readonly shard: number; readonly bundle: TensorBundle; readonly resend: boolean }
  | { readonly _tag: "Pushed"; readonly inflight: InFlight }
  | { readonly _tag: "Pull"; readonly shard: number; readonly minVersion: number }
  | { readonly _tag: "Release"; readonly batch: Batch; readonly reason: string }
  | { readonly _tag: "Finish" }
  /** a params bundle not believed (params-cache.ts): reported on `errors`, naming its sender. */
  | { readonly _tag: "RefuseParams"; readonly shard: number; readonly version: number; readonly sender?: string; readonly messageId?: string; readonly reason: string }
  | { readonly _tag: "Log"; readonly level: "debug" | "info" | "warn"; readonly message: string }

export const initialWorker = (cfg: WorkerConfig, consistency: WorkerState["consistency"], now: number): WorkerState => ({
  cfg, consistency, ...emptyCache(), held: [], leasing: false, leaseAfter: now,
  computing: false, recent: [], waitingSince: now, finished: false, now, lastReport: now, stats: { steps: 0, stale: 0, resent: 0, pulls: 0 }
})

/** The identity of the cached params: every shard's incarnation and version. */
export const cacheKey = (s: WorkerState): string | undefined => {
  if (s.cache.size < s.cfg.shards) return undefined
  const parts: string[] = []
  for (let k = 0; k < s.cfg.shards; k++) {
    const c = s.cache.get(k)!
    parts.push(`${c.incarnation}:${c.version}`)
  }
  return parts.join("/")
}

const versionsOf = (s: WorkerState) => new Map([...s.cache].map(([k, c]) => [k, c.version]))
const commonVersion = (s: WorkerState): number | undefined => {
  if (s.cache.size < s.cfg.shards) return undefined
  const vs = [...s.cache.values()].map((c) => c.version)
  return vs.every((v) => v === vs[0]) ? vs[0] : undefined
}

/**
 * A push ends (the next gradient may be computed) when every shard acknowledged it — sync:
 * admitted (the barrier then waits for the next version); bounded/async: APPLIED. A worker
 * has at most one gradient held at the servers, so their queue holds at most one per worker
 * and a gradient is at most about `workers` versions stale. Ending it at "held" let every
 * new version start a computation on every worker while a version consumes one gradient:
 * the queue grew to MAX_HELD and gradients were applied 64 versions stale (the loss diverged).
 */
const pushDone = (s: WorkerState, f: InFlight) => (s.consistency === "sync" ? f.acked : f.applied).size >= s.cfg.shards

/** A push is over (acknowledged, or overtaken): the next may start; it stays matchable by a late refusal. */
const settle = (s: WorkerState, f: InFlight) => {
  if (s.inflight === f) s.inflight = undefined
  s.recent = [f, ...s.recent.filter((x) => x !== f)].slice(0, 2)
  // sync: every shard had its batch applied already (a re-issued copy) and the params did not
  // move: the push added nothing, so the worker may compute again on these params (else it
  // would wait for a version that, with every worker in this state, never comes)
  if (s.consistency === "sync" && f.applied.size >= s.cfg.shards && cacheKey(s) === f.key && s.lastKey === f.key) s.lastKey = undefined
}

/** Params good to compute on now (not the ones already used). */
const paramsReady = (s: WorkerState): string | undefined => {
  const key = cacheKey(s)
  if (key === undefined || key === s.lastKey) return undefined
  // the last version (awaiting its servers' confirmation, `finish`): nothing is computed on it
  for (const c of s.cache.values()) if (c.version >= s.cfg.steps) return undefined
  if (s.consistency === "sync" && commonVersion(s) === undefined) return undefined
  return key
}

export const step = (s: WorkerState, e: WorkerEvent): WorkerEffect[] => {
  const out: WorkerEffect[] = []
  if (s.finished) return out
  switch (e._tag) {
    case "LeaseReplied": {
      s.leasing = false
      if (e.batch) {
        const b = e.batch
        const old = staleLease(s, b.meta.gen, s.now)
        if (old !== undefined) {
          // leased from a table the loader built before the latest server restart: it is
          // rebuilding (and re-serves this batch if it is still undone); handing it back is
          // ignored by a loader that rebuilt, and re-queues it in one that did not
          out.push({ _tag: "Release", batch: b, reason: old })
          s.leaseAfter = s.now + 100
        } else s.held.push(b)
      } else if (e.noBatch) s.leaseAfter = s.now + Math.max(50, e.noBatch.retryAfterMs)
      else {
        if (e.failed) out.push({ _tag: "Log", level: "debug", message: `lease: ${e.failed}` })
        s.leaseAfter = s.now + 200
      }
      break
    }
    case "ParamsReceived": {
      const got = takeParams(s, e, s.now, (x) => out.push(x))
      if (got === "stop") break
      if (got === "stale") {
        if (finish(s, out)) return out
        break
      }
      if (got === "restarted") {
        out.push({ _tag: "Log", level: "info", message: `shard ${e.shard} restarted (incarnation ${e.incarnation}, version ${e.version}): handing back ${s.held.length} held batches${s.inflight ? `, dropping the push of ${s.inflight.batchId}` : ""}` })
        for (const b of s.held) out.push({ _tag: "Release", batch: b, reason: `shard ${e.shard} restarted` })
        s.held = []
        s.inflight = undefined
        s.recent = []
        s.lastKey = undefined
      }
      s.waitingSince = s.now
      if (finish(s, out)) return out
      // sync: every shard moved past the version pushed on → it was applied (or superseded)
      const f = s.inflight
      if (f && s.consistency === "sync" && [...f.versions].every(([k, ver]) => (s.cache.get(k)?.version ?? -1) > ver)) settle(s, f)
      break
    }
    case "PullEnded":
      s.pulling.delete(e.shard)
      break
    case "ServerSeen": {
      const pull = serverSeen(s, e, s.now)
      if (pull) out.push(pull)
      if (finish(s, out)) return out
      break
    }
    case "PushAcked": {
      const f = s.inflight
      if (f && e.ack.batchId === f.batchId && e.ack.sender === s.cfg.id) {
        if (!f.acked.has(e.ack.shard)) f.sentAt = s.now // held: the resend clock now waits for the apply
        f.acked.add(e.ack.shard)
        if (e.ack.status === "applied") f.applied.add(e.ack.shard)
        if (pushDone(s, f)) settle(s, f)
      }
      break
    }
    case "PushRefused": {
      const r = e.rejected
      const matches = (f: InFlight | undefined) => f !== undefined && (r.step === undefined || r.step === f.versions.get(e.shard))
      // a push acknowledged as held can still be dropped (sync: the version was made without
      // it): the refusal then names a recent push, whose batches must go back to the loader
      const f = matches(s.inflight) ? s.inflight : s.recent.find(matches)
      if (!f) break
      if (r.code === "duplicate") {
        // another copy of a batch was applied: nothing of ours is lost
        f.acked.add(e.shard)
        f.applied.add(e.shard)
        if (f === s.inflight && pushDone(s, f)) settle(s, f)
        break
      }
      out.push({ _tag: "Log", level: "warn", message: `shard ${e.shard} refused my push of ${f.batchId} (${r.code}): ${r.reason}` })
      if (f === s.inflight) s.inflight = undefined
      s.recent = s.recent.filter((x) => x !== f)
      // the params did not move (a refused version, a bad batch): the next batch may be computed on them
      if (r.code !== "stale" && r.code !== "conflict" && cacheKey(s) === f.key && s.lastKey === f.key) s.lastKey = undefined
      if (r.code === "stale" || r.code === "conflict") {
        s.stats.stale++
        for (const b of f.micro) out.push({ _tag: "Release", batch: b, reason: `stale: ${r.reason}` })
      } else {
        // refused for what it holds (non-finite, bad tensor, ...): the loader counts it
        // against the batch, and gives a batch that keeps failing up
        for (const b of f.micro) out.push({ _tag: "Release", batch: b, reason: `refused (${r.code}): ${r.reason}` })
      }
      break
    }
    case "Computed": {
      s.computing = false
      // the watchdog counts the wait for params from here: a step's compute is not a lost broadcast
      // (else a step over watchdogMs made every worker pull every shard after each push)
      s.waitingSince = s.now
      // sync: a newer version arrived while computing — this gradient would be refused; the
      // batches go back to the loader so a worker computes them on fresh params
      if (s.consistency === "sync" && cacheKey(s) !== e.key) {
        s.stats.stale++
        for (const b of e.micro) out.push({ _tag: "Release", batch: b, reason: `stale: version ${[...e.versions.values()][0]} was superseded while computing` })
        break
      }
      const f: InFlight = { key: e.key, versions: e.versions, batchId: e.batchId, micro: e.micro, bundles: e.bundles, acked: new Set(), applied: new Set(), sentAt: s.now, attempts: 1 }
      s.inflight = f
      s.stats.steps++
      s.lastReport = s.now
      for (const [k, b] of e.bundles) out.push({ _tag: "Push", shard: k, bundle: b, resend: false })
      out.push({ _tag: "Pushed", inflight: f })
      break
    }
    case "StopRequested":
      s.finished = true
      out.push({ _tag: "Finish" })
      return out
    case "ConsistencyChanged":
      s.consistency = e.mode
      break
    case "Tick": {
      s.now = e.now
      const f = s.inflight
      if (f && s.now - f.sentAt >= s.cfg.ackTimeoutMs) {
        f.sentAt = s.now
        f.attempts++
        for (const [k, b] of f.bundles) {
          if ((s.consistency === "sync" ? f.acked : f.applied).has(k)) continue
          s.stats.resent++
          out.push({ _tag: "Push", shard: k, bundle: b, resend: true })
        }
      }
      if (s.now - s.lastReport >= 10_000) {
        // nothing computed for 10 s: say what the worker waits for
        s.lastReport = s.now
        out.push({ _tag: "Log", level: "info", message: `state: cache ${cacheKey(s) ?? `${s.cache.size}/${s.cfg.shards} shards`}, last computed on ${s.lastKey ?? "-"}, held ${s.held.map((b) => b.meta.batchId).join(" ") || "none"}, leasing ${s.leasing}, in flight ${s.inflight ? `${s.inflight.batchId} acked by [${[...s.inflight.acked]}]` : "none"}, steps ${s.stats.steps}` })
      }
      // the watchdog: ready to compute but for params, for too long
      if (!s.computing && s.held.length >= s.cfg.accumulate && paramsReady(s) === undefined && s.now - s.waitingSince >= s.cfg.watchdogMs) {
        s.waitingSince = s.now
        out.push(...pullAll(s, Array.from({ length: s.cfg.shards }, (_, k) => k)))
      }
      break
    }
  }
  next(s, out)
  return out
}

/**
 * The job's last version, on every shard and confirmed by each server (params-cache.ts
 * finalState: a broadcast alone is not enough): finish. Otherwise pull the unconfirmed.
 */
const finish = (s: WorkerState, out: WorkerEffect[]): boolean => {
  const f = finalState(s, Array.from({ length: s.cfg.shards }, (_, k) => k), s.cfg.steps)
  out.push(...f.pulls)
  if (!f.done) return false
  s.finished = true
  out.push({ _tag: "Finish" })
  return true
}

/** What to start now: a lease (keep one batch ahead), a computation. */
const next = (s: WorkerState, out: WorkerEffect[]) => {
  if (s.finished || s.computing) return
  const key = s.held.length >= s.cfg.accumulate && !s.inflight ? paramsReady(s) : undefined
  if (key !== undefined) {
    const micro = s.held.splice(0, s.cfg.accumulate)
    s.computing = true
    s.lastKey = key
    // ask for the next batch before computing: the loader answers while we compute
    if (!s.leasing && s.held.length < s.cfg.accumulate && s.now >= s.leaseAfter) {
      s.leasing = true
      out.push({ _tag: "Lease" })
    }
    out.push({ _tag: "Compute", key, versions: versionsOf(s), micro })
    return
  }
  if (!s.leasing && s.held.length < s.cfg.accumulate && s.now >= s.leaseAfter) {
    s.leasing = true
    out.push({ _tag: "Lease" })
  }
}
