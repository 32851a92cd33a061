/**
 * Implements: the data shard loader actor.
 *
 * Owns: the corpus, its batch plan (actors/loader/plan.ts) and the lease table of its
 * shard of batch indices. Serves `LeaseBatch` requests in the `loader` queue group:
 * the reply's payload is the batch tokens (int32 LE, B × (T + 1)) with a
 * `Flotilla-Batch` header (BatchLeased JSON). A batch is done when every
 * parameter-server shard has applied it (`ps.*.applied`); a lease that expires, a
 * worker that leaves or dies before pushing it (`metrics.worker` WorkerStep says it
 * pushed), or a `BatchFailed` puts it back in the queue.
 * Does not own: model, params, LR. Run alone: `flotilla launch loader --job NAME`.
 */
import { Effect, Result, Schedule, Scope } from "effect"
import { Bus, type BusMessage } from "../../shared/bus/Bus.ts"
import { onControl } from "../../shared/actor/control-listener.ts"
import { trackMembership, runHeartbeat } from "../../shared/actor/membership.ts"
import { makeReporter } from "../../shared/actor/report.ts"
import type { JobConfig } from "../../shared/config/job.ts"
import { loadCorpus } from "../../shared/data/corpus.ts"
import { decodeBytes, encodeMessage } from "../../shared/protocol/decode.ts"
import {
  BatchFailed,
  HEADER_BATCH,
  LeaseBatch,
  StepApplied,
  WorkerStep,
  type BatchLeased,
  type NoBatch
} from "../../shared/protocol/messages.ts"
import { PROTOCOL_VERSION, queues, subjects } from "../../shared/protocol/subjects.ts"
import { currentMetrics } from "../../shared/telemetry/metrics.ts"
import { LeaseTable, makeLmPlan, trainBatch, valBatch, type LmPlan } from "./plan.ts"

export interface LoaderOptions {
  readonly job: JobConfig
  readonly id: string
  /** this loader serves batch indices i with i % shards === shard. */
  readonly shard?: number
  readonly shards?: number
  readonly maxAttempts?: number
}

export interface LoaderHandle {
  readonly plan: LmPlan
  readonly table: LeaseTable
  setPaused(paused: boolean): void
}

const int32Bytes = (a: Int32Array): Uint8Array => {
  // the wire is little-endian; so is every platform Node runs on, but say it once
  const out = new Uint8Array(a.buffer, a.byteOffset, a.byteLength)
  return out
}

export const makePlanForJob = (job: JobConfig): LmPlan => {
  if (job.model.kind !== "gpt") throw new Error(`the loader serves language-model batches; model.kind is ${job.model.kind}`)
  const corpus = loadCorpus(job.data.corpus)
  return makeLmPlan(corpus.bytes, {
    T: job.model.contextLength,
    B: job.data.batchSize,
    valFraction: job.data.valFraction,
    seed: job.data.seed,
    valBatches: job.data.valBatches
  })
}

export const runLoader = (o: LoaderOptions): Effect.Effect<LoaderHandle, Error, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const { job, id } = o
    const s = subjects(job.job)
    const plan = yield* Effect.try({ try: () => makePlanForJob(job), catch: (e) => e as Error })
    const shard = o.shard ?? 0
    const shards = o.shards ?? 1
    const indices = Array.from({ length: plan.batchesPerEpoch }, (_, i) => i).filter((i) => i % shards === shard)
    const table = new LeaseTable(indices, { leaseMs: job.train.leaseTimeoutMs, maxAttempts: o.maxAttempts ?? 5 })
    const psShards = job.topology.psShards
    let paused = false
    const reject = makeReporter(bus, s, id)
    const metrics = yield* currentMetrics

    yield* Effect.logInfo(
      `loader ${id}: corpus ${job.data.corpus}, ${plan.train.length} train / ${plan.val.length} val bytes, ` +
        `${plan.batchesPerEpoch} batches of ${plan.B}×${plan.T + 1} per epoch (serving ${indices.length})`
    )

    const giveBack = (ids: ReadonlyArray<{ id: string; worker: string }>, why: string) =>
      Effect.forEach(
        ids,
        (l) =>
          table.givenUp.includes(l.id)
            ? reject({ code: "internal", reason: `batch ${l.id} given up after repeated failures (${why})`, subject: s.dataLease, sender: l.worker })
            : Effect.logInfo(`re-issuing ${l.id} (was leased to ${l.worker}): ${why}`),
        { discard: true }
      )

    const serveLease = (m: BusMessage) =>
      Effect.gen(function* () {
        const req = decodeBytes(LeaseBatch, m.subject, m.data)
        if (Result.isFailure(req)) {
          yield* reject({ code: "bad-message", reason: req.failure.reason, subject: m.subject }, m)
          return
        }
        const r = req.success
        if (r.split === "val") {
          if (r.index === undefined || r.index >= job.data.valBatches) {
            yield* reject({ code: "invalid-value", reason: `val batch index must be in [0, ${job.data.valBatches})`, subject: m.subject, sender: r.worker }, m)
            return
          }
          const tokens = valBatch(plan, r.index)
          const meta: BatchLeased = { _tag: "BatchLeased", v: PROTOCOL_VERSION, batchId: `val-${r.index}`, epoch: 0, index: r.index, split: "val", B: plan.B, T: plan.T, attempt: 1, leaseMs: 0 }
          yield* bus.respond(m, int32Bytes(tokens), { [HEADER_BATCH]: JSON.stringify(meta) })
          return
        }
        if (paused) {
          const nb: NoBatch = { _tag: "NoBatch", v: PROTOCOL_VERSION, reason: "paused", retryAfterMs: 200 }
          yield* bus.respond(m, encodeMessage(nb))
          return
        }
        const l = table.lease(r.worker, Date.now())
        const meta: BatchLeased = { _tag: "BatchLeased", v: PROTOCOL_VERSION, batchId: l.id, epoch: l.epoch, index: l.index, split: "train", B: plan.B, T: plan.T, attempt: l.attempt, leaseMs: table.leaseMs }
        yield* bus.respond(m, int32Bytes(trainBatch(plan, l.epoch, l.index)), { [HEADER_BATCH]: JSON.stringify(meta) })
      })

    yield* bus.subscribe(s.dataLease, serveLease, { queue: queues.loader })

    yield* bus.subscribe(s.dataAck, (m) =>
      Effect.gen(function* () {
        const f = decodeBytes(BatchFailed, m.subject, m.data)
        if (Result.isFailure(f)) {
          yield* reject({ code: "bad-message", reason: f.failure.reason, subject: m.subject }, m)
          return
        }
        const l = table.release(f.success.batchId)
        if (l) yield* giveBack([l], `worker ${f.success.worker}: ${f.success.reason}`)
      })
    )

    yield* bus.subscribe(s.psAppliedAll, (m) =>
      Effect.gen(function* () {
        const a = decodeBytes(StepApplied, m.subject, m.data)
        if (Result.isFailure(a)) return yield* Effect.logWarning(a.failure.message)
        for (const b of a.success.batchIds) table.applied(b, a.success.shard, psShards)
      })
    )

    // a worker reports each push (WorkerStep): its batch now waits on the parameter
    // servers, so it is not re-issued if the worker leaves (plan.ts LeaseTable.pushed)
    yield* bus.subscribe(s.metrics("worker"), (m) => {
      const w = decodeBytes(WorkerStep, m.subject, m.data)
      // an accumulated gradient names its micro-batches: `e0-b1+e0-b7`
      if (Result.isSuccess(w)) for (const b of w.success.batchId.split("+")) table.pushed(b, w.success.worker, Date.now())
      return Effect.void
    })

    yield* trackMembership(s, job.train.livenessMs, (e) =>
      e.kind === "left" && e.member.role === "worker"
        ? giveBack(table.dropWorker(e.member.id), `worker ${e.member.id} ${e.why}`)
        : Effect.void
    )

    yield* Effect.forkScoped(
      Effect.suspend(() => giveBack(table.expire(Date.now()), "lease expired")).pipe(Effect.repeat(Schedule.spaced(250)))
    )

    const hb = yield* runHeartbeat(s, "loader", id, job.train.heartbeatMs)
    yield* Effect.forkScoped(
      Effect.sync(() => {
        hb.setInfo({ epoch: table.epoch, done: table.doneCount, leased: table.outstanding })
        metrics.setLeasesOutstanding(table.outstanding)
      }).pipe(
        Effect.repeat(Schedule.spaced(job.train.heartbeatMs))
      )
    )
    const setPaused = (p: boolean) => {
      paused = p
      hb.setState(p ? "paused" : "running")
    }
    // pause: leases answer NoBatch "paused"; stop: no more leases (the process then exits)
    yield* onControl(s, {
      pause: () => Effect.sync(() => setPaused(true)),
      resume: () => Effect.sync(() => setPaused(false)),
      stop: () => Effect.sync(() => setPaused(true))
    })
    return {
      plan,
      table,
      setPaused
    } satisfies LoaderHandle
  })
