/**
 * Implements: the loader's pure core — its state and `step(state, event) → [state, effects]`.
 *
 * The lease table of this loader's shard of batch indices, the parameter servers' applied
 * logs it is built from, and every rule of the loader contract (docs/PROTOCOL.md "Data",
 * "Loader contract"): done = applied on every PS shard (the intersection of their logs);
 * a build (start, or a PS incarnation not built on) takes a new `gen`, revokes every lease,
 * and serves, from the lowest open epoch, the undone indices in index order; re-issued
 * batches (expired, failed by their owner under the current gen, owner left before every
 * shard acknowledged its push) go to the front; after `maxAttempts` a batch is given up.
 * Bounded: the pending queue is a cursor plus the re-issues, leases ≤ outstanding, logs are
 * bitmaps (shared/protocol/applied-log.ts).
 * Does not own: I/O, clocks (every timed event carries `now`), the corpus and its tokens
 * (plan.ts), the wire form (protocol.ts), the shell that runs the effects (loader.ts).
 * Pure: a state is a value; a log that changes is copied first.
 */
import type { BusMessage } from "../../shared/bus/Bus.ts"
import type { Rejection } from "../../shared/actor/report.ts"
import { AppliedLog, batchId, parseBatchId, type BatchRef } from "../../shared/protocol/applied-log.ts"
import type {
  AppliedLog as AppliedLogReply,
  BatchFailed,
  BatchLeased,
  LeaseBatch,
  NoBatch,
  PushAck,
  StepApplied
} from "../../shared/protocol/messages.ts"
import { PROTOCOL_VERSION } from "../../shared/protocol/subjects.ts"

export interface LoaderConfig {
  readonly id: string
  /** the batch indices of an epoch this loader serves (its shard of them), ascending. */
  readonly indices: readonly number[]
  /** batches per epoch, all loader shards together (BatchLeased.epochBatches). */
  readonly epochBatches: number
  readonly psShards: number
  readonly B: number
  readonly T: number
  readonly valBatches: number
  readonly leaseMs: number
  readonly maxAttempts: number
  /** ask a shard whose log is missing again this long after the last ask. */
  readonly logRetryMs: number
  /** re-fetch every shard's log this often while serving (heals lost StepApplied); 0 = never. */
  readonly refreshMs: number
  /** the lease subject, named in rejections. */
  readonly leaseSubject: string
}

export interface Pending {
  readonly epoch: number
  readonly index: number
  /** attempts so far (0 for a batch never leased under this gen). */
  readonly attempt: number
  /**
   * releases that may be the batch's own fault (its lease expired with its owner alive, or
   * a refusal of its gradient); a batch is given up after `maxAttempts` of them. A release
   * because its worker died or restarted, or its gradient was merely stale, is not one:
   * under kills a healthy batch must never be given up (none skipped).
   */
  readonly faults?: number
}

export interface Lease extends Pending {
  readonly id: string
  readonly worker: string
  readonly deadline: number
  /** PS shards that acknowledged the owner's push of this batch. */
  readonly acked: ReadonlyArray<number>
}

/** What the loader knows of one PS shard. */
export interface ShardView {
  /** the newest incarnation heard of (log reply, StepApplied, PushAck, heartbeat). */
  readonly known: number
  /** the shard's applied log, of incarnation `builtOn`; undefined while awaited. */
  readonly log: AppliedLog | undefined
  readonly builtOn: number
  /** id of the newest log request; its reply is the only one accepted. */
  readonly seq: number
  readonly inflight: boolean
  readonly askedAt: number
  /** log requests that failed in a row (only the first, then every 20th, is logged at info). */
  readonly failures: number
  /** StepApplied batch ids seen while a request is in flight (replayed onto its reply). */
  readonly buffer: ReadonlyArray<{ readonly incarnation: number; readonly ids: readonly string[] }>
}

export interface LoaderState {
  readonly cfg: LoaderConfig
  readonly gen: number
  readonly paused: boolean
  readonly shards: ReadonlyArray<ShardView>
  /** re-issued batches, served first. */
  readonly reissue: ReadonlyArray<Pending>
  /** the next fresh batch: `cfg.indices[pos]` of `epoch`. */
  readonly cursor: { readonly epoch: number; readonly pos: number }
  readonly leases: ReadonlyMap<string, Lease>
  /** batches done (applied on every shard), all epochs, all loader shards. */
  readonly done: number
  readonly givenUp: number
  readonly seq: number
}

// ---------------------------------------------------------------- events and effects

export type LoaderEvent =
  | { readonly _tag: "LeaseRequested"; readonly request: LeaseBatch; readonly replyTo: BusMessage; readonly now: number }
  | { readonly _tag: "BadMessageReceived"; readonly subject: string; readonly reason: string; readonly replyTo?: BusMessage }
  | { readonly _tag: "BatchFailedReceived"; readonly failed: BatchFailed }
  | { readonly _tag: "StepAppliedReceived"; readonly applied: StepApplied; readonly now: number }
  | { readonly _tag: "PushAckReceived"; readonly ack: PushAck; readonly now: number }
  | { readonly _tag: "AppliedLogReceived"; readonly shard: number; readonly seq: number; readonly reply: AppliedLogReply; readonly now: number }
  | { readonly _tag: "AppliedLogFailed"; readonly shard: number; readonly seq: number; readonly reason: string }
  | { readonly _tag: "MemberLeft"; readonly role: string; readonly id: string; readonly why: string }
  | { readonly _tag: "ServerSeen"; readonly shard: number; readonly incarnation: number; readonly now: number }
  | { readonly _tag: "ControlApplied"; readonly verb: "pause" | "resume" | "stop" }
  | { readonly _tag: "Tick"; readonly now: number }

export interface LoaderStatus {
  readonly gen: number
  readonly epoch: number
  readonly done: number
  readonly leased: number
  readonly rebuilding: boolean
  readonly paused: boolean
  readonly givenUp: number
}

export type LoaderEffect =
  | { readonly _tag: "ReplyBatch"; readonly to: BusMessage; readonly meta: BatchLeased }
  | { readonly _tag: "ReplyNoBatch"; readonly to: BusMessage; readonly reason: NoBatch["reason"]; readonly retryAfterMs: number }
  | { readonly _tag: "Reject"; readonly rejection: Rejection; readonly to?: BusMessage }
  | { readonly _tag: "RequestLog"; readonly shard: number; readonly seq: number }
  | { readonly _tag: "Log"; readonly level: "debug" | "info" | "warning"; readonly message: string }
  | { readonly _tag: "Status"; readonly status: LoaderStatus }

export type Step = readonly [LoaderState, ReadonlyArray<LoaderEffect>]

const log = (level: "debug" | "info" | "warning", message: string): LoaderEffect => ({ _tag: "Log", level, message })

// ---------------------------------------------------------------- queries

export const isBuilding = (st: LoaderState): boolean => st.shards.some((v) => v.log === undefined)

export const isDone = (st: LoaderState, ref: BatchRef): boolean => st.shards.every((v) => v.log !== undefined && v.log.has(ref))

export const statusOf = (st: LoaderState): LoaderStatus => ({
  gen: st.gen,
  epoch: st.cursor.epoch,
  done: st.done,
  leased: st.leases.size,
  rebuilding: isBuilding(st),
  paused: st.paused,
  givenUp: st.givenUp
})

/** Batches applied on every log: whole epochs below the lowest watermark, then bit by bit. */
export const countDone = (logs: readonly AppliedLog[], epochBatches: number): number => {
  if (logs.length === 0) return 0
  const low = Math.min(...logs.map((l) => l.openFrom))
  const high = Math.max(...logs.map((l) => Math.max(l.openFrom - 1, ...l.openEpochs)))
  let n = low * epochBatches
  for (let epoch = low; epoch <= high; epoch++) {
    for (let index = 0; index < epochBatches; index++) if (logs.every((l) => l.has({ epoch, index }))) n++
  }
  return n
}

const cloneLog = (l: AppliedLog): AppliedLog => AppliedLog.fromJSON(l.toJSON())

const logsOf = (shards: ReadonlyArray<ShardView>): AppliedLog[] => shards.flatMap((v) => (v.log ? [v.log] : []))

/** Micro-batch ids of a (possibly accumulated, "+"-joined) batch id. */
const microIds = (id: string): string[] => id.split("+").filter((x) => x.length > 0)

// ---------------------------------------------------------------- construction

const emptyShard: ShardView = { known: 0, log: undefined, builtOn: -1, seq: 0, inflight: false, askedAt: -Infinity, failures: 0, buffer: [] }

/** A loader that has not heard from any shard yet (gen 0: no table); `start` builds one. */
export const initialState = (cfg: LoaderConfig): LoaderState => ({
  cfg,
  gen: 0,
  paused: false,
  shards: Array.from({ length: cfg.psShards }, () => emptyShard),
  reissue: [],
  cursor: { epoch: 0, pos: 0 },
  leases: new Map(),
  done: 0,
  givenUp: 0,
  seq: 0
})

/** The state and first effects of a loader started at `now`: a build. */
export const start = (cfg: LoaderConfig, now: number): Step => build(initialState(cfg), now, "start")

const ask = (st: LoaderState, k: number, now: number): Step => {
  const seq = st.seq + 1
  const shards = st.shards.map((v, i) => (i === k ? { ...v, seq, inflight: true, askedAt: now, buffer: [] } : v))
  return [{ ...st, seq, shards }, [{ _tag: "RequestLog", shard: k, seq }]]
}

/** A new gen: every lease revoked, every shard's log asked for again. */
const build = (st0: LoaderState, now: number, why: string): Step => {
  const gen = Math.max(now, st0.gen + 1)
  const fx: LoaderEffect[] = [log("info", `loader ${st0.cfg.id}: building lease table gen ${gen} from the parameter servers' applied logs (${why})`)]
  if (st0.leases.size > 0) fx.push(log("info", `loader ${st0.cfg.id}: revoking ${st0.leases.size} lease(s) of gen ${st0.gen}`))
  let st: LoaderState = {
    ...st0,
    gen,
    shards: st0.shards.map((v) => ({ ...v, log: undefined, builtOn: -1 })),
    reissue: [],
    leases: new Map(),
    cursor: { epoch: 0, pos: 0 }
  }
  for (let k = 0; k < st.shards.length; k++) {
    const [next, e] = ask(st, k, now)
    st = next
    fx.push(...e)
  }
  return [st, fx]
}

/** Every log is in: serve from the lowest open epoch, in index order. */
const finishBuild = (st: LoaderState): Step => {
  const logs = logsOf(st.shards)
  const epoch = Math.min(...logs.map((l) => l.openFrom))
  const done = countDone(logs, st.cfg.epochBatches)
  return [
    { ...st, cursor: { epoch, pos: 0 }, done },
    [log("info", `loader ${st.cfg.id}: lease table gen ${st.gen} ready: ${done} batches done, serving from epoch ${epoch}`)]
  ]
}

/** Drop leases and re-issues of batches that are now done. */
const prune = (st: LoaderState): LoaderState => {
  if (isBuilding(st)) return st
  const leases = new Map([...st.leases].filter(([, l]) => !isDone(st, l)))
  const reissue = st.reissue.filter((p) => !isDone(st, p))
  return leases.size === st.leases.size && reissue.length === st.reissue.length ? st : { ...st, leases, reissue }
}

// ---------------------------------------------------------------- incarnations and logs

/** An incarnation of shard k was heard of; a newer one than the table's is a rebuild. */
const seen = (st: LoaderState, k: number, incarnation: number, now: number): Step => {
  const v = st.shards[k]
  if (v === undefined || incarnation <= v.known) return [st, []]
  const shards = st.shards.map((x, i) => (i === k ? { ...x, known: incarnation } : x))
  const next = { ...st, shards }
  return v.log !== undefined ? build(next, now, `ps shard ${k} is a new incarnation ${incarnation} (table built on ${v.builtOn})`) : [next, []]
}

const BUFFER_CAP = 4096

/** Batch ids shard k applied (StepApplied, or a PushAck "applied") under `incarnation`. */
const applied = (st: LoaderState, k: number, incarnation: number, ids: readonly string[]): LoaderState => {
  const v = st.shards[k]
  if (v === undefined || incarnation !== v.known) return st
  const buffer = v.inflight ? [...v.buffer, { incarnation, ids }].slice(-BUFFER_CAP) : v.buffer
  if (v.log === undefined || v.builtOn !== incarnation) return { ...st, shards: st.shards.map((x, i) => (i === k ? { ...x, buffer } : x)) }
  const wasDone = ids.map((id) => {
    const r = parseBatchId(id)
    return r !== undefined && isDone(st, r)
  })
  const logK = cloneLog(v.log)
  for (const id of ids) {
    const r = parseBatchId(id)
    if (r) logK.add(r, st.cfg.epochBatches)
  }
  const next: LoaderState = { ...st, shards: st.shards.map((x, i) => (i === k ? { ...x, log: logK, buffer } : x)) }
  let done = st.done
  ids.forEach((id, i) => {
    const r = parseBatchId(id)
    if (r && !wasDone[i] && isDone(next, r)) done++
  })
  return prune({ ...next, done })
}

const onLog = (st: LoaderState, e: Extract<LoaderEvent, { _tag: "AppliedLogReceived" }>): Step => {
  const k = e.shard
  const v = st.shards[k]
  if (v === undefined || e.seq !== v.seq || !v.inflight) return [st, []]
  const inc = e.reply.incarnation
  if (e.reply.shard !== k) return [{ ...st, shards: st.shards.map((x, i) => (i === k ? { ...x, inflight: false, buffer: [] } : x)) }, [log("warning", `loader ${st.cfg.id}: ps.${k}.log answered for shard ${e.reply.shard}; asking again`)]]
  if (inc < v.known) {
    // a reply from a process older than one already heard of: ask again on a later Tick
    return [{ ...st, shards: st.shards.map((x, i) => (i === k ? { ...x, inflight: false, buffer: [] } : x)) }, []]
  }
  if (v.log !== undefined && inc > v.builtOn) {
    // a refresh found a restarted shard
    return build(st, e.now, `ps shard ${k} is a new incarnation ${inc} (table built on ${v.builtOn})`)
  }
  const logK = AppliedLog.fromJSON(e.reply.log)
  for (const b of v.buffer) {
    if (b.incarnation !== inc) continue
    for (const id of b.ids) {
      const r = parseBatchId(id)
      if (r) logK.add(r, st.cfg.epochBatches)
    }
  }
  const wasBuilding = isBuilding(st)
  const shards = st.shards.map((x, i) => (i === k ? { ...x, known: inc, log: logK, builtOn: inc, inflight: false, failures: 0, buffer: [] } : x))
  const next: LoaderState = { ...st, shards }
  if (isBuilding(next)) return [next, [log("debug", `loader ${st.cfg.id}: got ps shard ${k}'s applied log (incarnation ${inc}, version ${e.reply.version})`)]]
  if (wasBuilding) return finishBuild(next)
  // a refresh: the fetched log replaces ours (same incarnation: it only grew)
  return [prune({ ...next, done: countDone(logsOf(shards), st.cfg.epochBatches) }), []]
}

// ---------------------------------------------------------------- leases

const leaseId = (p: BatchRef) => batchId(p.epoch, p.index)

/** The next batch to hand out: a re-issue, else the cursor's next undone, unleased index. */
// No epoch limit here: a job bounded by train.epochs ends when the servers' applied logs
// hold its last epoch whole (a loader that ran dry would leave a sync barrier waiting on
// a worker with nothing to push); the few batches of the next epoch already out are applied.
const nextBatch = (st: LoaderState): { readonly pending: Pending; readonly st: LoaderState } => {
  const reissue = [...st.reissue]
  while (reissue.length > 0) {
    const p = reissue.shift()!
    if (!isDone(st, p) && !st.leases.has(leaseId(p))) return { pending: p, st: { ...st, reissue } }
  }
  const { indices } = st.cfg
  let { epoch, pos } = st.cursor
  for (;;) {
    if (pos >= indices.length) {
      epoch++
      pos = 0
    }
    const p = { epoch, index: indices[pos++], attempt: 0 }
    if (!isDone(st, p) && !st.leases.has(leaseId(p))) return { pending: p, st: { ...st, reissue, cursor: { epoch, pos } } }
  }
}

const onLease = (st: LoaderState, e: Extract<LoaderEvent, { _tag: "LeaseRequested" }>): Step => {
  const { cfg } = st
  const r = e.request
  if (r.split === "val") {
    if (r.index === undefined || r.index >= cfg.valBatches) {
      return [st, [{ _tag: "Reject", to: e.replyTo, rejection: { code: "invalid-value", reason: `val batch index must be in [0, ${cfg.valBatches})`, subject: cfg.leaseSubject, sender: r.worker } }]]
    }
    const meta: BatchLeased = { _tag: "BatchLeased", v: PROTOCOL_VERSION, batchId: `val-${r.index}`, epoch: 0, index: r.index, split: "val", B: cfg.B, T: cfg.T, attempt: 1, leaseMs: 0, gen: st.gen, epochBatches: cfg.epochBatches, valBatches: cfg.valBatches }
    return [st, [{ _tag: "ReplyBatch", to: e.replyTo, meta }]]
  }
  if (st.paused) return [st, [{ _tag: "ReplyNoBatch", to: e.replyTo, reason: "paused", retryAfterMs: 200 }]]
  if (isBuilding(st)) return [st, [{ _tag: "ReplyNoBatch", to: e.replyTo, reason: "rebuilding", retryAfterMs: Math.min(500, cfg.logRetryMs) }]]
  const { pending, st: next } = nextBatch(st)
  const l: Lease = { ...pending, id: leaseId(pending), worker: r.worker, attempt: pending.attempt + 1, deadline: e.now + cfg.leaseMs, acked: [] }
  const meta: BatchLeased = { _tag: "BatchLeased", v: PROTOCOL_VERSION, batchId: l.id, epoch: l.epoch, index: l.index, split: "train", B: cfg.B, T: cfg.T, attempt: l.attempt, leaseMs: cfg.leaseMs, gen: st.gen, epochBatches: cfg.epochBatches, valBatches: cfg.valBatches }
  return [{ ...next, leases: new Map(next.leases).set(l.id, l) }, [{ _tag: "ReplyBatch", to: e.replyTo, meta }]]
}

/** A worker's BatchFailed reason that is not the batch's fault (worker/worker.ts Release reasons). */
const NOT_A_FAULT = /^(stale|lease generation|shard \d+ restarted)/

/** Put leased batches back at the front (first of `ls` first), or give them up (`fault`: see Pending.faults). */
const release = (st: LoaderState, ls: readonly Lease[], why: string, fault: boolean): Step => {
  if (ls.length === 0) return [st, []]
  const leases = new Map(st.leases)
  const back: Pending[] = []
  const fx: LoaderEffect[] = []
  let givenUp = st.givenUp
  for (const l of ls) {
    leases.delete(l.id)
    const faults = (l.faults ?? 0) + (fault ? 1 : 0)
    if (faults >= st.cfg.maxAttempts) {
      givenUp++
      fx.push({ _tag: "Reject", rejection: { code: "internal", reason: `batch ${l.id} given up after repeated failures (${why})`, subject: st.cfg.leaseSubject, sender: l.worker } })
    } else {
      back.push({ epoch: l.epoch, index: l.index, attempt: l.attempt, faults })
      fx.push(log("info", `re-issuing ${l.id} (was leased to ${l.worker}): ${why}`))
    }
  }
  return [{ ...st, leases, givenUp, reissue: [...back, ...st.reissue] }, fx]
}

const onFailed = (st: LoaderState, f: BatchFailed): Step => {
  if (f.gen !== st.gen) return [st, [log("debug", `loader ${st.cfg.id}: ignoring BatchFailed of ${f.batchId} from ${f.worker}: gen ${f.gen}, table is gen ${st.gen}`)]]
  const mine = microIds(f.batchId).flatMap((id) => {
    const l = st.leases.get(id)
    return l !== undefined && l.worker === f.worker ? [l] : []
  })
  if (mine.length === 0) return [st, [log("debug", `loader ${st.cfg.id}: ignoring BatchFailed of ${f.batchId} from ${f.worker}: not its lease`)]]
  return release(st, mine, `worker ${f.worker}: ${f.reason}`, !NOT_A_FAULT.test(f.reason))
}

const onAck = (st0: LoaderState, e: Extract<LoaderEvent, { _tag: "PushAckReceived" }>): Step => {
  const a = e.ack
  const [st1, fx] = seen(st0, a.shard, a.incarnation, e.now)
  const v = st1.shards[a.shard]
  if (v === undefined || a.incarnation !== v.builtOn) return [st1, fx]
  const ids = microIds(a.batchId)
  const st = a.status === "applied" ? applied(st1, a.shard, a.incarnation, ids) : st1
  const leases = new Map(st.leases)
  for (const id of ids) {
    const l = leases.get(id)
    if (l === undefined || l.worker !== a.sender || l.acked.includes(a.shard)) continue
    leases.set(id, { ...l, acked: [...l.acked, a.shard], deadline: Math.max(l.deadline, e.now + st.cfg.leaseMs) })
  }
  return [{ ...st, leases }, fx]
}

const isPushed = (st: LoaderState, l: Lease) => l.acked.length >= st.cfg.psShards

const onTick = (st0: LoaderState, now: number): Step => {
  // released in lease order, all before older re-issues: the oldest is served first
  const expired = [...st0.leases.values()].filter((l) => l.deadline <= now)
  let [st, fx] = release(st0, expired, "lease expired", true)
  const out = [...fx]
  for (let k = 0; k < st.shards.length; k++) {
    const v = st.shards[k]
    if (v.inflight) continue
    const due = v.log === undefined ? now - v.askedAt >= st.cfg.logRetryMs : st.cfg.refreshMs > 0 && now - v.askedAt >= st.cfg.refreshMs
    if (!due) continue
    ;[st, fx] = ask(st, k, now)
    out.push(...fx)
  }
  out.push({ _tag: "Status", status: statusOf(st) })
  return [st, out]
}

// ---------------------------------------------------------------- the reducer

export const step = (st: LoaderState, e: LoaderEvent): Step => {
  switch (e._tag) {
    case "LeaseRequested":
      return onLease(st, e)
    case "BadMessageReceived":
      return [st, [{ _tag: "Reject", to: e.replyTo, rejection: { code: "bad-message", reason: e.reason, subject: e.subject } }]]
    case "BatchFailedReceived":
      return onFailed(st, e.failed)
    case "StepAppliedReceived": {
      const a = e.applied
      const [next, fx] = seen(st, a.shard, a.incarnation, e.now)
      return [applied(next, a.shard, a.incarnation, a.batchIds.flatMap(microIds)), fx]
    }
    case "PushAckReceived":
      return onAck(st, e)
    case "AppliedLogReceived":
      return onLog(st, e)
    case "AppliedLogFailed": {
      const v = st.shards[e.shard]
      if (v === undefined || e.seq !== v.seq) return [st, []]
      const failures = v.failures + 1
      const shards = st.shards.map((x, i) => (i === e.shard ? { ...x, inflight: false, failures, buffer: [] } : x))
      const level = v.log === undefined && failures % 20 === 1 ? "info" : "debug"
      return [{ ...st, shards }, [log(level, `loader ${st.cfg.id}: ps shard ${e.shard}'s applied log (try ${failures}): ${e.reason}; asking again in ${st.cfg.logRetryMs} ms`)]]
    }
    case "MemberLeft": {
      if (e.role !== "worker") return [st, []]
      const orphans = [...st.leases.values()].filter((l) => l.worker === e.id && !isPushed(st, l))
      return release(st, orphans, `worker ${e.id} ${e.why}`, false)
    }
    case "ServerSeen":
      return seen(st, e.shard, e.incarnation, e.now)
    case "ControlApplied": {
      const next = { ...st, paused: e.verb !== "resume" }
      return [next, [{ _tag: "Status", status: statusOf(next) }]]
    }
    case "Tick":
      return onTick(st, e.now)
  }
}
