/**
 * Implements: the data shard loader actor — the thin effectful shell around core.ts.
 *
 * One mailbox: subscriptions (`data.lease.*` in the `loader` queue group, `data.ack.*`,
 * `ps.*.applied`, `ps.*.ack.*`, PS heartbeats), membership (a worker left), control
 * (pause/resume/stop) and a timer (`Tick`) only enqueue events; one fiber takes them off
 * the queue, runs the pure reducer `step` and performs the effects it returns (reply with
 * a batch or NoBatch, reject, ask a PS shard for its applied log, log, heartbeat status).
 * A log request runs in its own fiber and enqueues its answer, so the mailbox never waits
 * on the network. A lease reply's payload is the batch tokens (actors/loader/protocol.ts).
 * Owns: the corpus and its batch plan (plan.ts). Does not own: the lease rules (core.ts),
 * model, params, LR. Run alone: `flotilla launch loader --job NAME`.
 */
import { Data, Effect, Queue, Ref, Result, Schedule, Scope } from "effect"
import { Bus, type BusMessage } from "../../shared/bus/Bus.ts"
import { onControl } from "../../shared/actor/control-listener.ts"
import { runHeartbeat, trackMembership } from "../../shared/actor/membership.ts"
import { makeReporter } from "../../shared/actor/report.ts"
import type { JobConfig } from "../../shared/config/job.ts"
import { decodeBytes, encodeMessage } from "../../shared/protocol/decode.ts"
import {
  AppliedLog as AppliedLogReply,
  BatchFailed,
  FetchBatch,
  Heartbeat,
  LeaseBatch,
  PushAck,
  StepApplied
} from "../../shared/protocol/messages.ts"
import { queues, senderProblem, subjects } from "../../shared/protocol/subjects.ts"
import { currentMetrics } from "../../shared/telemetry/metrics.ts"
import { start, statusOf, step, type LoaderConfig, type LoaderEffect, type LoaderEvent, type LoaderStatus } from "./core.ts"
import { makePlanForJob, type DataPlan } from "./tasks.ts"
import { encodeBatch, getAppliedLog, noBatch } from "./protocol.ts"
import { mkdirSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { GetDataInfo, type BatchLeased, type DataInfo } from "../../shared/protocol/messages.ts"
import { parseBatchId } from "../../shared/protocol/applied-log.ts"
import { PROTOCOL_VERSION } from "../../shared/protocol/subjects.ts"

export interface LoaderOptions {
  readonly job: JobConfig
  readonly id: string
  /** this loader serves batch indices i with i % shards === shard. */
  readonly shard?: number
  readonly shards?: number
  readonly maxAttempts?: number
  /** the Tick period: lease expiry, log retries, heartbeat status. Default 250 ms. */
  readonly tickMs?: number
  /** ask a PS shard that has not answered its applied log again after this. Default 500 ms. */
  readonly logRetryMs?: number
  /** one applied-log request's timeout. Default 2 s. */
  readonly logTimeoutMs?: number
  /** re-fetch every shard's applied log this often while serving; 0 = never. Default 10 s. */
  readonly refreshMs?: number
  /** a classifier's train/val split is written to `<runsDir>/<job>/split.json`. Default "runs". */
  readonly runsDir?: string
}

export interface LoaderHandle {
  readonly plan: DataPlan
  /** the table as of the last event the mailbox handled. */
  status(): LoaderStatus
  /** pause (leases answer NoBatch "paused") or resume; goes through the mailbox. */
  setPaused(paused: boolean): void
}

/** The job cannot be served by a loader (an empty loader shard, a bad topology). */
export class LoaderConfigError extends Data.TaggedError("LoaderConfigError")<{ readonly message: string }> {}

export { makePlanForJob } from "./tasks.ts"

const PS_HEARTBEAT = ".hb.ps."

export const runLoader = (o: LoaderOptions): Effect.Effect<LoaderHandle, Error, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const scope = yield* Effect.scope
    const { job, id } = o
    const s = subjects(job.job)
    const plan = yield* Effect.try({
      try: () => makePlanForJob(job),
      catch: (e) => (e instanceof Error ? e : new LoaderConfigError({ message: String(e) }))
    })
    const shard = o.shard ?? 0
    const shards = o.shards ?? 1
    const indices = Array.from({ length: plan.batchesPerEpoch }, (_, i) => i).filter((i) => i % shards === shard)
    if (!(job.topology.psShards >= 1)) return yield* new LoaderConfigError({ message: `topology.psShards must be at least 1, got ${job.topology.psShards}` })
    if (indices.length === 0) {
      return yield* new LoaderConfigError({ message: `loader shard ${shard} of ${shards} has no batches (an epoch has ${plan.batchesPerEpoch})` })
    }
    const cfg: LoaderConfig = {
      id,
      indices,
      epochBatches: plan.batchesPerEpoch,
      psShards: job.topology.psShards,
      B: plan.B,
      T: plan.T,
      valBatches: plan.valBatches,
      leaseMs: job.train.leaseTimeoutMs,
      maxAttempts: o.maxAttempts ?? 5,
      logRetryMs: o.logRetryMs ?? 500,
      refreshMs: o.refreshMs ?? 10_000,
      leaseSubject: s.dataLeaseAny
    }
    const logTimeoutMs = o.logTimeoutMs ?? 2_000
    const reject = makeReporter(bus, s, id)
    const metrics = yield* currentMetrics
    const mailbox = yield* Queue.unbounded<LoaderEvent>()
    const offer = (e: LoaderEvent) => Queue.offer(mailbox, e).pipe(Effect.asVoid)

    yield* Effect.logInfo(`loader ${id}: ${plan.task}: ${plan.describe} (serving ${indices.length})`)
    if (plan.split !== undefined) {
      const dir = join(o.runsDir ?? "runs", job.job)
      yield* Effect.try(() => {
        mkdirSync(dir, { recursive: true })
        writeFileSync(join(dir, "split.json"), JSON.stringify(plan.split, null, 1) + "\n")
      }).pipe(
        Effect.flatMap(() => Effect.logInfo(`loader ${id}: train/val split written to ${join(dir, "split.json")}`)),
        Effect.catch((e) => Effect.logWarning(`loader ${id}: cannot write ${join(dir, "split.json")}: ${String(e)}`))
      )
    }
    const info: DataInfo = {
      _tag: "DataInfo", v: PROTOCOL_VERSION, task: plan.task, corpus: job.data.corpus, epochBatches: plan.batchesPerEpoch, valBatches: plan.valBatches,
      trainSamples: plan.trainSamples, valSamples: plan.valSamples,
      ...(plan.labels ? { labels: [...plan.labels] } : {}), ...(plan.tokenizer !== undefined ? { tokenizer: plan.tokenizer } : {})
    }
    const infoBytes = encodeMessage(info)
    const hb = yield* runHeartbeat(s, "loader", id, job.train.heartbeatMs)

    // ---- the effects the reducer asks for
    const requestLog = (k: number, seq: number) =>
      bus.request(s.psLog(k), encodeMessage(getAppliedLog(id)), { timeoutMs: logTimeoutMs }).pipe(
        Effect.map((m): LoaderEvent => {
          const r = decodeBytes(AppliedLogReply, m.subject, m.data)
          return Result.isSuccess(r)
            ? { _tag: "AppliedLogReceived", shard: k, seq, reply: r.success, now: Date.now() }
            : { _tag: "AppliedLogFailed", shard: k, seq, reason: r.failure.message }
        }),
        Effect.catch((e) => Effect.succeed<LoaderEvent>({ _tag: "AppliedLogFailed", shard: k, seq, reason: `${e._tag}: ${e.message}` })),
        Effect.flatMap(offer)
      )

    const replyBatch = (to: BusMessage, meta: Extract<LoaderEffect, { _tag: "ReplyBatch" }>["meta"]) =>
      Effect.try({
        try: () => encodeBatch(meta, meta.split === "val" ? plan.valBatch(meta.index) : plan.trainBatch(meta.epoch, meta.index)),
        catch: (e) => new LoaderConfigError({ message: `cannot cut ${meta.batchId}: ${e instanceof Error ? e.message : String(e)}` })
      }).pipe(
        Effect.flatMap(({ data, headers }) => bus.respond(to, data, headers)),
        Effect.catch((e) =>
          e._tag === "LoaderConfigError"
            ? reject({ code: "internal", reason: e.message, subject: s.dataLeaseAny }, to).pipe(Effect.asVoid)
            : Effect.logWarning(`loader ${id}: reply with ${meta.batchId} not sent: ${e.message}`)
        )
      )

    const perform = (fx: LoaderEffect): Effect.Effect<void> => {
      switch (fx._tag) {
        case "ReplyBatch":
          return replyBatch(fx.to, fx.meta)
        case "ReplyNoBatch":
          return bus.respond(fx.to, encodeMessage(noBatch(fx.reason, fx.retryAfterMs))).pipe(Effect.ignore)
        case "Reject":
          return reject(fx.rejection, fx.to).pipe(Effect.asVoid)
        case "RequestLog":
          return Effect.forkIn(requestLog(fx.shard, fx.seq), scope).pipe(Effect.asVoid)
        case "Log":
          return fx.level === "info" ? Effect.logInfo(fx.message) : fx.level === "warning" ? Effect.logWarning(fx.message) : Effect.logDebug(fx.message)
        case "Status":
          return Effect.sync(() => {
            const st = fx.status
            hb.setInfo({ epoch: st.epoch, done: st.done, leased: st.leased, gen: st.gen, table: st.rebuilding ? "rebuilding" : "serving" })
            hb.setState(st.paused ? "paused" : "running")
            metrics.setLeasesOutstanding(st.leased)
          })
      }
    }

    // ---- the one fiber that owns the state
    const [first, firstEffects] = start(cfg, Date.now())
    const snapshot = yield* Ref.make(first)
    yield* Effect.forkScoped(
      Effect.gen(function* () {
        yield* Effect.forEach(firstEffects, perform, { discard: true })
        let st = first // owned by this fiber alone; others read `snapshot`
        while (true) {
          const e = yield* Queue.take(mailbox)
          const r = Result.try(() => step(st, e))
          if (Result.isFailure(r)) {
            yield* Effect.logError(`loader ${id}: event ${e._tag} failed in the reducer; state kept`, r.failure)
            continue
          }
          st = r.success[0]
          yield* Ref.set(snapshot, st)
          yield* Effect.forEach(r.success[1], perform, { discard: true })
        }
      })
    )

    // ---- everything else only enqueues
    // the subject names the worker (its user alone may request there): a request for another is refused
    const otherWorker = (subject: string, worker: string) => senderProblem(subject, worker, "request")
    yield* bus.subscribe(
      s.dataLeaseAny,
      (m) => {
        const r = decodeBytes(LeaseBatch, m.subject, m.data)
        const other = Result.isSuccess(r) ? otherWorker(m.subject, r.success.worker) : undefined
        return offer(
          Result.isSuccess(r) && other === undefined
            ? { _tag: "LeaseRequested", request: r.success, replyTo: m, now: Date.now() }
            : { _tag: "BadMessageReceived", subject: m.subject, reason: Result.isFailure(r) ? r.failure.reason : other!, replyTo: m }
        )
      },
      { queue: queues.loader }
    )
    // what the data is: answered from the plan, outside the mailbox (it never changes)
    yield* bus.subscribe(
      s.dataInfo,
      (m) => {
        const r = decodeBytes(GetDataInfo, m.subject, m.data)
        return Result.isSuccess(r) ? bus.respond(m, infoBytes).pipe(Effect.ignore) : reject({ code: "bad-message", reason: r.failure.reason, subject: m.subject }, m).pipe(Effect.asVoid)
      },
      { queue: queues.loader }
    )
    // a batch by id (a pipeline's last stage: the targets of its micro-batch): from the plan, outside the mailbox
    yield* bus.subscribe(
      s.dataFetch,
      (m) => {
        const r = decodeBytes(FetchBatch, m.subject, m.data)
        if (Result.isFailure(r)) return reject({ code: "bad-message", reason: r.failure.reason, subject: m.subject }, m).pipe(Effect.asVoid)
        const ref = parseBatchId(r.success.batchId)
        if (ref === undefined || ref.index >= plan.batchesPerEpoch) {
          return reject({ code: "unknown-batch", reason: `no train batch ${JSON.stringify(r.success.batchId)} (an epoch has ${plan.batchesPerEpoch}, ids e<epoch>-b<index>)`, subject: m.subject, sender: r.success.worker }, m).pipe(Effect.asVoid)
        }
        const meta: BatchLeased = { _tag: "BatchLeased", v: PROTOCOL_VERSION, batchId: r.success.batchId, epoch: ref.epoch, index: ref.index, split: "train", B: plan.B, T: plan.T, attempt: 0, leaseMs: 0, gen: 0, epochBatches: plan.batchesPerEpoch }
        return replyBatch(m, meta)
      },
      { queue: queues.loader }
    )
    yield* bus.subscribe(s.dataAckAny, (m) => {
      const r = decodeBytes(BatchFailed, m.subject, m.data)
      const other = Result.isSuccess(r) ? otherWorker(m.subject, r.success.worker) : undefined
      return offer(Result.isSuccess(r) && other === undefined ? { _tag: "BatchFailedReceived", failed: r.success } : { _tag: "BadMessageReceived", subject: m.subject, reason: Result.isFailure(r) ? r.failure.reason : other! })
    })
    yield* bus.subscribe(s.psAppliedAll, (m) => {
      const r = decodeBytes(StepApplied, m.subject, m.data)
      return Result.isSuccess(r) ? offer({ _tag: "StepAppliedReceived", applied: r.success, now: Date.now() }) : Effect.logWarning(r.failure.message)
    })
    // a refused push gets a Rejected on the same subject: not the loader's business
    yield* bus.subscribe(s.psAckAll, (m) => {
      const r = decodeBytes(PushAck, m.subject, m.data)
      return Result.isSuccess(r) ? offer({ _tag: "PushAckReceived", ack: r.success, now: Date.now() }) : Effect.void
    })
    // a PS heartbeat names its incarnation: a restarted shard is seen even when it applies nothing
    yield* bus.subscribe(s.hbAll, (m) => {
      if (!m.subject.startsWith(s.prefix + PS_HEARTBEAT)) return Effect.void
      const r = decodeBytes(Heartbeat, m.subject, m.data)
      if (Result.isFailure(r) || r.success.state === "leaving") return Effect.void
      const k = Number(r.success.info?.["shard"])
      const incarnation = Number(r.success.info?.["incarnation"])
      return Number.isInteger(k) && k >= 0 && Number.isFinite(incarnation) && incarnation > 0
        ? offer({ _tag: "ServerSeen", shard: k, incarnation, now: Date.now() })
        : Effect.void
    })
    yield* trackMembership(s, job.train.livenessMs, (e) =>
      e.kind === "left" ? offer({ _tag: "MemberLeft", role: e.member.role, id: e.member.id, why: e.why }) : Effect.void
    )
    // pause: leases answer NoBatch "paused"; stop: no more leases (the process then exits)
    yield* onControl(s, {
      pause: () => offer({ _tag: "ControlApplied", verb: "pause" }),
      resume: () => offer({ _tag: "ControlApplied", verb: "resume" }),
      stop: () => offer({ _tag: "ControlApplied", verb: "stop" })
    }, id)
    const tickMs = o.tickMs ?? 250
    yield* Effect.forkScoped(Effect.suspend(() => offer({ _tag: "Tick", now: Date.now() })).pipe(Effect.repeat(Schedule.spaced(tickMs))))

    return {
      plan,
      status: () => statusOf(Ref.getUnsafe(snapshot)),
      setPaused: (p: boolean) => void Queue.offerUnsafe(mailbox, { _tag: "ControlApplied", verb: p ? "pause" : "resume" })
    } satisfies LoaderHandle
  })
