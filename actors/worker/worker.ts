/**
 * Implements: the forward/backward worker actor (and, with `mode: "eval"`, the evaluator
 * that reports validation loss) — the effectful shell around the worker's mailbox reducer
 * (core.ts).
 *
 * Holds nothing durable: a cached copy of each shard's latest params (the `ps.*.version`
 * broadcasts, and pulls when they are late or missed). Train: one queue of events (lease
 * replies, params, push acks and refusals on `ps.*.ack.<id>`, server heartbeats, control,
 * a Tick) feeds the reducer; its effects are performed in order: lease (LoaderClient, in a
 * fiber of this scope, so the next batch is requested while computing), compute (forward +
 * backward with TensorFlow.js; gradients encoded once per shard, f32 or int8 with error
 * feedback, and kept until acknowledged), push, pull, release a batch, report `WorkerStep`.
 * Needs the Compute service (a TensorFlow.js backend). Run alone:
 * `flotilla launch worker --job FILE --nats URL`.
 */
import { runsOf, serverPosition } from "./params-cache.ts"
import { Deferred, Effect, Queue, Result, Schedule, Scope } from "effect"
import { Bus, type BusShape } from "../../shared/bus/Bus.ts"
import { onControl } from "../../shared/actor/control-listener.ts"
import { failpoint, isArmed } from "../../shared/actor/failpoint.ts"
import { runHeartbeat } from "../../shared/actor/membership.ts"
import type { JobConfig } from "../../shared/config/job.ts"
import { Compute } from "../../shared/compute/backend.ts"
import { addSums, batchProblem, lossAndGrads, scoreBatch } from "../../shared/models/model.ts"
import { modelForJob, trainableNames } from "../../shared/models/zoo.ts"
import { decodeBytes, encodeMessage } from "../../shared/protocol/decode.ts"
import { Heartbeat, PushAck, Rejected, type ErrorCode, type GradMeta, type ValidationLoss, type WorkerStep } from "../../shared/protocol/messages.ts"
import { makeReporter } from "../../shared/actor/report.ts"
import { checkParams, paramsExpectation, shardOfSubject } from "../../shared/protocol/params-check.ts"
import { senderOfMessageId } from "../../shared/wire/budget.ts"
import * as tf from "@tensorflow/tfjs"
import { explainWasmAbort } from "../../shared/compute/memory.ts"
import { bundleLimits, heapProblemFor, shardOfForJob } from "../../shared/models/pipeline.ts"
import { PROTOCOL_VERSION, subjects } from "../../shared/protocol/subjects.ts"
import { currentMetrics } from "../../shared/telemetry/metrics.ts"
import { GradEncoder, specOf } from "../../shared/wire/compression.ts"
import type { TensorBundle } from "../../shared/wire/tensor.ts"
import { SenderResiduals, tensorLengths } from "../../shared/checkpoint/sender-state.ts"
import { receiveBundles, sendBundle } from "../../shared/wire/transport.ts"
import { LoaderClient } from "../loader/protocol.ts"
import { ParamServerClient } from "../param-server/protocol.ts"
import { accumulateGrads } from "./accumulate.ts"
import { evalStep, initialEval, isEvalEvent, type EvalEffect, type EvalEvent } from "./eval-core.ts"
import { initialWorker, step, type Batch, type WorkerEffect, type WorkerEvent, type WorkerState } from "./core.ts"

export interface WorkerOptions {
  readonly job: JobConfig
  readonly id: string
  readonly mode?: "train" | "eval"
  /**
   * push gradients to the quantizer relay of this name (actors/quantizer) over the fast local
   * link, f32; it sums its workers' gradients and sends one compressed push per version on.
   */
  readonly relay?: string
}

export interface WorkerHandle {
  /** completes when the job's final version is seen (or the worker is told to stop). */
  readonly finished: Deferred.Deferred<void>
  readonly stats: { steps: number; stale: number; tokens: number; bytesSent: number; resent: number; pulls: number }
}

const TICK_MS = 100

export const runWorker = (o: WorkerOptions): Effect.Effect<WorkerHandle, Error, Bus | Compute | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    yield* Compute
    const scope = yield* Effect.scope
    const { job, id } = o
    const mode = o.mode ?? "train"
    const s = subjects(job.job)
    const model = modelForJob(job)
    const trainable = new Set(trainableNames(job, model))
    const shards = job.topology.psShards
    if (mode === "train" && job.topology.stages > 1) return yield* Effect.fail(new Error(`job ${job.job} is a pipeline of ${job.topology.stages} stages: its workers are stage workers (flotilla launch worker --stage K)`))
    // the wasm heap is 32-bit: a model too big for it is refused with the reason, before it corrupts memory
    const heap = mode === "train" && tf.getBackend() === "wasm" ? heapProblemFor(job, model) : undefined
    if (heap !== undefined) return yield* Effect.fail(new Error(heap))
    const shardOf = shardOfForJob(job, model)
    const limits = bundleLimits(job, model)
    // error feedback: what each tensor's codec could not send yet, kept across restarts (sender-state.ts);
    // restored at the first step, once the params say which run they belong to (a fresh start is a new run)
    const encoder = new GradEncoder(job.train.compression.minElements)
    const senderState = mode === "train" && !o.relay ? new SenderResiduals(job, id, encoder.residuals, shardOf, tensorLengths(model.specs)) : undefined
    if (senderState?.corrupt) yield* Effect.logWarning(`worker ${id}: ${senderState.corrupt}; starting with zero residuals`)
    const saveResiduals = (version: number) =>
      Effect.suspend(() => { const err = senderState?.trySave(version, runsOf(state)); return err ? Effect.logWarning(`worker ${id}: ${err}`) : Effect.void })
    if (senderState) yield* Effect.addFinalizer(() => saveResiduals(Math.max(0, senderState.lastSaved)).pipe(Effect.ignore))
    const stats = { steps: 0, stale: 0, tokens: 0, bytesSent: 0, resent: 0, pulls: 0 }
    const finished = yield* Deferred.make<void>()
    const metrics = yield* currentMetrics
    // one mailbox: the trainer's events, or (mode eval) the evaluator's; both carry the params
    const queue = yield* Queue.unbounded<WorkerEvent | EvalEvent>()
    const offer = (e: WorkerEvent | EvalEvent) => Effect.sync(() => void Queue.offerUnsafe(queue, e))

    // ---- params: broadcasts and pulls become ParamsReceived (receiveBundles gives each bundle its own buffer: ours to keep)
    // checked first (shared/protocol/params-check.ts: job, shard, names, shapes, dtypes, finite);
    // which versions are believed is the reducer's (params-cache.ts); a refusal goes on `errors`
    const reject = makeReporter(bus, s, id)
    const expect = paramsExpectation(job, model.specs, shardOf)
    const refuseParams = (r: { reason: string; code?: ErrorCode; subject: string; sender?: string; version?: number; messageId?: string }) =>
      reject({ code: r.code ?? "invalid-value", reason: r.reason, subject: r.subject, ...(r.sender !== undefined ? { sender: r.sender } : {}), ...(r.version !== undefined ? { step: r.version } : {}), ...(r.messageId !== undefined ? { messageId: r.messageId } : {}) }).pipe(Effect.asVoid)
    const paramsEvent = (b: TensorBundle, from: { source: "broadcast" | "pull"; subject: string; shard?: number; id?: string }): Effect.Effect<WorkerEvent | undefined> => {
      const c = checkParams(b, expect, Date.now(), from.shard)
      if (!c.ok) return refuseParams({ ...c, subject: from.subject, sender: b.meta.sender, version: b.meta.version, messageId: from.id }).pipe(Effect.as(undefined))
      const m = c.meta
      // f32 as is; bf16 (train.compression.params) widened
      return Effect.succeed({
        _tag: "ParamsReceived", shard: m.shard, incarnation: m.incarnation, version: b.meta.version, epochsDone: m.epochsDone, codec: m.codec, run: m.run,
        params: c.params, source: from.source, sender: b.meta.sender, ...(from.id !== undefined ? { messageId: from.id } : {})
      })
    }
    // the parameter servers' ids (from their heartbeats): their broadcasts are reassembled in the known senders' pool
    const knownServers = new Set<string>()
    yield* receiveBundles(bus, s.psVersionAll, (b, info) =>
      paramsEvent(b, { source: "broadcast", subject: info.from, shard: shardOfSubject(info.from), id: info.id }).pipe(Effect.flatMap((e) => (e ? offer(e) : Effect.void))), {
      ...limits,
      isKnownSender: (x) => knownServers.has(x),
      onError: (e, info) => refuseParams({ code: "wire", reason: e.message, subject: info.subject, sender: senderOfMessageId(info.id), ...(info.id !== undefined ? { messageId: info.id } : {}) })
    })
    const pulled = (k: number, b: TensorBundle) =>
      paramsEvent(b, { source: "pull", subject: s.psPull(k), shard: k }).pipe(Effect.flatMap((e) => offer(e ?? { _tag: "PullEnded", shard: k })))
    const pull = (k: number, minVersion: number) =>
      ParamServerClient.pull(bus, s, k, id, minVersion, 10_000, limits).pipe(
        Effect.flatMap((r) => pulled(k, r.bundle)),
        Effect.catch((e) => Effect.logDebug(`worker ${id}: pull of shard ${k}: ${e.message}`).pipe(Effect.andThen(offer({ _tag: "PullEnded", shard: k }))))
      )
    // a server heartbeat says which version and incarnation it is at: a missed broadcast shows
    yield* bus.subscribe(s.hbRole("ps"), (m) => {
      const hb = decodeBytes(Heartbeat, m.subject, m.data)
      if (Result.isFailure(hb) || hb.success.state === "leaving") return Effect.void
      if (knownServers.size < 256) knownServers.add(hb.success.id)
      const seen = serverPosition(hb.success)
      return seen && seen.shard < shards ? offer(seen) : Effect.void
    })

    // a relayed worker says so from its first beat: the parameter servers wait for its relay, not for it
    const hb = yield* runHeartbeat(s, mode === "eval" ? "evaluator" : "worker", id, job.train.heartbeatMs, o.relay ? { relay: o.relay } : {})

    // ---- join: pull every shard once (broadcasts, heartbeats and the watchdog keep us current)
    const joinPull = (k: number) =>
      ParamServerClient.pull(bus, s, k, id, 0, 10_000, limits).pipe(
        Effect.flatMap((r) => pulled(k, r.bundle)),
        Effect.retry({ times: 30, schedule: Schedule.spaced(300) }),
        Effect.catch((e) => Effect.logWarning(`worker ${id}: pull of shard ${k} failed: ${e.message} (heartbeats will retry)`))
      )

    if (mode === "eval") {
      yield* Effect.forEach(Array.from({ length: shards }, (_, k) => k), joinPull, { discard: true })
      yield* evalLoop({ job, id, queue, pull, metrics, bus, s, model, scope, refuseParams }).pipe(
        Effect.catchCause((c) => Effect.logError(`evaluator ${id} loop ended`, c)),
        Effect.ensuring(Deferred.succeed(finished, undefined)),
        Effect.forkScoped
      )
      return { finished, stats } satisfies WorkerHandle
    }

    // a relayed worker hears from its relay (which passes the servers' answers on), the others from the servers
    yield* bus.subscribe(o.relay ? s.relayAckFor(o.relay, id) : s.psAckFor(id), (m) => {
      const shard = Number(m.subject.split(".").at(-3))
      const a = decodeBytes(PushAck, m.subject, m.data)
      if (Result.isSuccess(a)) return offer({ _tag: "PushAcked", ack: a.success })
      const r = decodeBytes(Rejected, m.subject, m.data)
      return Result.isSuccess(r) ? offer({ _tag: "PushRefused", rejected: r.success, shard }) : Effect.logWarning(`worker ${id}: bad ack on ${m.subject}`)
    })
    yield* onControl(s, {
      stop: () => offer({ _tag: "StopRequested" }),
      "set-consistency": (c) => offer({ _tag: "ConsistencyChanged", mode: c.mode })
    }, id)

    const state: WorkerState = initialWorker(
      {
        id, shards, steps: job.train.steps, accumulate: job.train.accumulate,
        ackTimeoutMs: Math.max(1_000, 4 * job.train.heartbeatMs), watchdogMs: Math.max(2_000, 4 * job.train.heartbeatMs)
      },
      job.train.consistency.mode,
      Date.now()
    )

    // ---- effects
    // step phases (WorkerStep): from the end of the last push, the wait until the batch was
    // here (0 when the prefetched one already was), then until the params were, then compute
    let lastPushAt = performance.now()
    const batchArrived = new Map<string, number>()
    let bytesAtLastPush = 0
    const compute = (e: Extract<WorkerEffect, { _tag: "Compute" }>) =>
      Effect.gen(function* () {
        const t2 = performance.now()
        const params = new Map<string, Float32Array>()
        for (const c of state.cache.values()) for (const [k, v] of c.params) params.set(k, v)
        const v = Math.min(...e.versions.values())
        const g = yield* Effect.try({
          try: () => accumulateGrads(e.micro.map((b) => ({ batchId: b.meta.batchId, samples: b.data.size, ...lossAndGrads(model, params, b.data, trainable) }))),
          catch: (err) => err
        }).pipe(
          // a wasm abort (the heap ran out) leaves a process that cannot compute: say so and exit
          Effect.catch((err) => {
            const abort = explainWasmAbort(err)
            return abort === undefined ? Effect.die(err) : Effect.logError(`worker ${id}: ${abort}`).pipe(Effect.andThen(Effect.sync(() => process.exit(70))), Effect.andThen(Effect.die(err)))
          }),
          Effect.withSpan("worker.forward_backward", { attributes: { "flotilla.version": v, "flotilla.micro_batches": e.micro.length } })
        )
        const t3 = performance.now()
        const restored = senderState?.restore((k) => state.cache.get(k)?.run)
        if (restored) yield* Effect.logInfo(`worker ${id}: ${restored}`)
        let normSq = 0
        for (const x of g.grads.values()) for (let i = 0; i < x.length; i++) normSq += x[i] * x[i]
        const tokens = e.micro.reduce((n, b) => n + model.units(b.data).n, 0)
        const first = e.micro[0].meta
        const bundles = new Map<number, TensorBundle>()
        for (let k = 0; k < shards; k++) {
          // the codec the server stamped on the version computed on (a relay's workers send f32: the relay compresses)
          const codecName = o.relay ? "f32" : state.cache.get(k)!.codec ?? "f32"
          const codec = specOf(codecName)
          // frozen tensors (train.freeze, LoRA's base) are not sent: the shard holds no optimizer state for them.
          // f32: an embedding's gradient goes as its non-zero rows when that is smaller (shared/wire/rows.ts)
          const tensors = model.specs
            .filter((sp) => shardOf.get(sp.name) === k && trainable.has(sp.name))
            .flatMap((sp) => encoder.encode(codec, sp.name, sp.shape, g.grads.get(sp.name)!))
          const extra: GradMeta = {
            samples: g.samples, tokens, loss: g.loss, normSq, micro: g.batchId, gen: first.gen, epochBatches: first.epochBatches,
            incarnation: state.cache.get(k)!.incarnation,
            ...(o.relay ? { stamp: state.cache.get(k)!.codec ?? "f32", ...(state.cache.get(k)!.run !== undefined ? { run: state.cache.get(k)!.run } : {}) } : {})
          }
          bundles.set(k, { tensors, meta: { kind: "grads", job: job.job, version: e.versions.get(k)!, step: e.versions.get(k)!, sender: id, batchId: g.batchId, codec: codecName, extra } })
        }
        const batchAt = Math.max(lastPushAt, ...e.micro.map((b) => batchArrived.get(b.meta.batchId) ?? lastPushAt))
        for (const b of e.micro) batchArrived.delete(b.meta.batchId)
        computeTimes = { waitBatch: batchAt - lastPushAt, waitParams: Math.max(0, t2 - batchAt), compute: t3 - t2, loss: g.loss, tokens, version: v, t3 }
        // handled at once, in this fiber and span: the pushes belong to the step's trace
        yield* handle({ _tag: "Computed", key: e.key, versions: e.versions, micro: e.micro, batchId: g.batchId, bundles })
      })
    let computeTimes = { waitBatch: 0, waitParams: 0, compute: 0, loss: 0, tokens: 0, version: 0, t3: 0 }

    const perform = (e: WorkerEffect): Effect.Effect<void> => {
      switch (e._tag) {
        case "Lease": {
          return Effect.asVoid(
            Effect.forkIn(
              // a batch that does not fit the model (names, dtypes, shapes, ids) goes back to the loader with the reason
              LoaderClient.leaseChecked(bus, s, id, (b) => batchProblem(model, b)).pipe(
                Effect.flatMap((r) => {
                  if (r._tag === "Batch") {
                    if (batchArrived.size > 16) batchArrived.clear()
                    batchArrived.set(r.meta.batchId, performance.now())
                  }
                  return offer(
                    r._tag === "Batch"
                      ? { _tag: "LeaseReplied", batch: { meta: r.meta, data: r.batch } satisfies Batch }
                      : r._tag === "NoBatch"
                        ? { _tag: "LeaseReplied", noBatch: { reason: r.reason, retryAfterMs: r.retryAfterMs } }
                        : { _tag: "LeaseReplied", failed: r.reason }
                  )
                })
              ),
              scope,
              { startImmediately: true }
            )
          )
        }
        case "Compute":
          // the short sleep lets the lease request's socket write happen before TensorFlow.js holds the thread
          return Effect.sleep(1).pipe(Effect.andThen(compute(e)), Effect.orDie)
        case "Push":
          return sendBundle(bus, o.relay ? s.relayPush(o.relay, e.shard, id) : s.psPush(e.shard, id), e.bundle).pipe(
            Effect.tap((sent) => Effect.sync(() => {
              stats.bytesSent += sent.bytes
              metrics.addBytes("sent", sent.bytes, "grads")
              if (e.resend) stats.resent++
            })),
            // drills: die with shard 0 holding this gradient and shard 1 not (shared/actor/failpoint.ts)
            Effect.tap(() => (e.shard === 0 && shards > 1 && !e.resend && isArmed("worker.between-pushes") ? bus.flush().pipe(Effect.andThen(Effect.sync(() => failpoint("worker.between-pushes")))) : Effect.void)),
            Effect.catch((err) => Effect.logWarning(`worker ${id}: push to shard ${e.shard} failed (${err.message}); it is resent`))
          )
        case "Pushed": {
          const t4 = performance.now()
          const c = computeTimes
          stats.steps++
          stats.tokens += c.tokens
          hb.setInfo({ version: c.version, steps: stats.steps, ...(o.relay ? { relay: o.relay } : {}) })
          // the residuals are saved with the job's checkpoint cadence (and on a clean exit)
          const save = senderState?.due(c.version) ? saveResiduals(c.version) : Effect.void
          const metric: WorkerStep = {
            _tag: "WorkerStep", v: PROTOCOL_VERSION, worker: id, version: c.version, batchId: e.inflight.batchId, loss: c.loss, tokens: c.tokens,
            waitBatchMs: c.waitBatch, waitParamsMs: c.waitParams, computeMs: c.compute, pushMs: t4 - c.t3, bytesSent: stats.bytesSent - bytesAtLastPush
          }
          bytesAtLastPush = stats.bytesSent
          metrics.recordLoss("train", c.loss)
          metrics.recordStepTimes({ wait_batch: metric.waitBatchMs, wait_params: metric.waitParamsMs, compute: metric.computeMs, push: metric.pushMs, total: t4 - lastPushAt })
          if (t4 > lastPushAt) metrics.recordTokensPerSec((c.tokens * 1000) / (t4 - lastPushAt))
          lastPushAt = t4
          return save.pipe(Effect.andThen(bus.publish(s.metrics("worker"), encodeMessage(metric))), Effect.ignore)
        }
        case "Pull":
          return Effect.asVoid(Effect.forkIn(pull(e.shard, e.minVersion), scope))
        case "Release":
          return LoaderClient.fail(bus, s, id, e.batch.meta.batchId, e.batch.meta.gen, e.reason)
        case "Finish":
          return Deferred.succeed(finished, undefined).pipe(Effect.asVoid)
        case "RefuseParams":
          return refuseParams({ reason: e.reason, subject: s.psVersion(e.shard), sender: e.sender, version: e.version, messageId: e.messageId })
        case "Log":
          return e.level === "warn" ? Effect.logWarning(`worker ${id}: ${e.message}`) : e.level === "info" ? Effect.logInfo(`worker ${id}: ${e.message}`) : Effect.logDebug(`worker ${id}: ${e.message}`)
      }
    }

    /** One event through the reducer, its effects in order; a step that computes is one `worker.step` span (one trace). */
    const handle = (e: WorkerEvent | EvalEvent): Effect.Effect<void> =>
      Effect.suspend(() => {
        if (e._tag === "ValReady") return Effect.void
        state.now = e._tag === "Tick" ? e.now : Date.now()
        const effects = step(state, e)
        const run = Effect.forEach(effects, perform, { discard: true })
        return effects.some((x) => x._tag === "Compute") ? run.pipe(Effect.withSpan("worker.step", { root: true, attributes: { "flotilla.worker": id } })) : run
      })

    // ---- the mailbox
    yield* Effect.forkScoped(
      Effect.gen(function* () {
        while (!state.finished) yield* handle(yield* Queue.take(queue))
        stats.stale = state.stats.stale
        stats.pulls = state.stats.pulls
      }).pipe(
        Effect.catchCause((c) => Effect.logError(`worker ${id} mailbox ended`, c)),
        Effect.ensuring(Deferred.succeed(finished, undefined))
      )
    )
    yield* Effect.forkScoped(Effect.forever(Effect.sleep(TICK_MS).pipe(Effect.andThen(Effect.suspend(() => offer({ _tag: "Tick", now: Date.now() }))))))
    yield* Effect.forEach(Array.from({ length: shards }, (_, k) => k), joinPull, { discard: true, concurrency: "unbounded" })
    yield* offer({ _tag: "Tick", now: Date.now() })
    return { finished, stats } satisfies WorkerHandle
  })

// ---------------------------------------------------------------- evaluator

interface EvalContext {
  readonly job: JobConfig
  readonly id: string
  readonly queue: Queue.Queue<WorkerEvent | EvalEvent>
  readonly pull: (k: number, minVersion: number) => Effect.Effect<void>
  readonly scope: Scope.Scope
  readonly metrics: Effect.Success<typeof currentMetrics>
  readonly bus: BusShape
  readonly s: ReturnType<typeof subjects>
  readonly model: ReturnType<typeof modelForJob>
  readonly refuseParams: (r: { reason: string; subject: string; sender?: string; version?: number; messageId?: string }) => Effect.Effect<void>
}

/**
 * The evaluator's shell: its mailbox (the params and heartbeat events of the worker's queue,
 * and a Tick) through `evalStep` (eval-core.ts); effects: pull, evaluate + publish
 * `ValidationLoss`, finish. The validation batches are leased in a fiber of this scope.
 */
const evalLoop = (c: EvalContext): Effect.Effect<void, Error> =>
  Effect.gen(function* () {
    const { job, id, bus, s, model, metrics } = c
    const val: Batch[] = []
    const leaseVal = Effect.gen(function* () {
      // how many there are, the loader says with the first one (a classifier's whole val split)
      let count = 1
      for (let i = 0; i < count; i++) {
        let b = yield* LoaderClient.lease(bus, s, id, "val", i)
        for (let tries = 0; b._tag !== "Batch" && tries < 50; tries++) {
          yield* Effect.sleep(200)
          b = yield* LoaderClient.lease(bus, s, id, "val", i)
        }
        if (b._tag !== "Batch") return yield* Effect.die(new Error(`evaluator ${id}: val batch ${i}: ${b.reason}`))
        const bad = batchProblem(model, b.batch)
        if (bad !== undefined) return yield* Effect.die(new Error(`evaluator ${id}: val batch ${i}: ${bad}`))
        if (i === 0) count = b.meta.valBatches ?? job.data.valBatches
        val.push({ meta: b.meta, data: b.batch })
      }
      yield* Queue.offer(c.queue, { _tag: "ValReady" })
    })
    yield* Effect.forkIn(leaseVal.pipe(Effect.tapCause((cause) => Effect.logError(`evaluator ${id}: cannot evaluate`, cause))), c.scope)
    yield* Effect.forkIn(Effect.forever(Effect.sleep(250).pipe(Effect.andThen(Effect.suspend(() => Queue.offer(c.queue, { _tag: "Tick", now: Date.now() }))))), c.scope)
    const every = job.train.evalEvery === "epoch" ? "epoch" : Math.max(1, job.train.evalEvery)
    const state = initialEval({ shards: job.topology.psShards, steps: job.train.steps, every, epochs: job.train.epochs }, Date.now())
    const perform = (e: EvalEffect): Effect.Effect<void> => {
      switch (e._tag) {
        case "Pull":
          return Effect.asVoid(Effect.forkIn(c.pull(e.shard, 0), c.scope))
        case "Evaluate": {
          const sums: Record<string, number> = {}
          for (const b of val) addSums(sums, scoreBatch(model, e.params, b.data))
          const m = model.summarize(sums)
          const loss = m["loss"] ?? Number.NaN
          metrics.recordLoss("val", loss)
          const msg: ValidationLoss = { _tag: "ValidationLoss", v: PROTOCOL_VERSION, evaluator: id, version: e.version, loss, batches: val.length, metrics: m, epoch: e.epochsDone }
          return bus.publish(s.metrics("evaluator"), encodeMessage(msg)).pipe(Effect.ignore)
        }
        case "Finish":
          return Effect.void
        case "RefuseParams":
          return c.refuseParams({ reason: e.reason, subject: s.psVersion(e.shard), sender: e.sender, version: e.version, messageId: e.messageId })
      }
    }
    while (!state.done) {
      const e = yield* Queue.take(c.queue)
      if (isEvalEvent(e)) for (const eff of evalStep(state, e)) yield* perform(eff)
    }
  })
