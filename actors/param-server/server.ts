/**
 * Implements: the parameter-server actor for one shard of tensors.
 *
 * Owns: its tensors' params and optimizer state (actors/param-server/aggregate.ts), the
 * version counter, checkpoints (checkpoint.ts). Receives gradient bundles on
 * `ps.<k>.push`, answers `ps.<k>.pull`, and after each update publishes the new params
 * on `ps.<k>.version` and a `StepApplied` on `ps.<k>.applied`. Membership (who the sync
 * barrier waits for) comes from heartbeats. The LR of step v is asked of the scheduler
 * (`lr`); with no scheduler live it falls back to the job's schedule, computed locally.
 * Run alone: `flotilla launch param-server --job FILE --shard K`.
 */
import { Deferred, Effect, Result, Scope, Semaphore } from "effect"
import { Bus, type BusMessage } from "../../shared/bus/Bus.ts"
import { onControl } from "../../shared/actor/control-listener.ts"
import { runHeartbeat, trackMembership } from "../../shared/actor/membership.ts"
import { makeReporter } from "../../shared/actor/report.ts"
import type { JobConfig } from "../../shared/config/job.ts"
import { makeModel } from "../../shared/models/zoo.ts"
import { makeOptimizer, resolveOptimizer, setHyperparams, type OptimizerPatch } from "../../shared/optim/optimizers.ts"
import { decodeBytes, encodeMessage } from "../../shared/protocol/decode.ts"
import { LrForStep, PullParams, StepApplied } from "../../shared/protocol/messages.ts"
import { shardSpecs } from "../../shared/protocol/sharding.ts"
import { PROTOCOL_VERSION, subjects } from "../../shared/protocol/subjects.ts"
import { lrAt, resolveSchedule, type ScheduleInput } from "../../shared/schedule/schedules.ts"
import { currentMetrics } from "../../shared/telemetry/metrics.ts"
import { fromWire } from "../../shared/wire/codec.ts"
import type { TensorBundle } from "../../shared/wire/tensor.ts"
import { receiveBundles, replyWithBundle, sendBundle } from "../../shared/wire/transport.ts"
import { ShardState } from "./aggregate.ts"
import { loadLatestCheckpoint, writeCheckpoint } from "./checkpoint.ts"

export interface ParamServerOptions {
  readonly job: JobConfig
  readonly shard: number
  readonly id: string
  /** resume from the newest valid checkpoint (default true). */
  readonly resume?: boolean
  /** the first version waits until this many workers are live (default topology.workers). */
  readonly minWorkers?: number
}

export interface ParamServerHandle {
  readonly state: ShardState
  /** completes when the job's last step is applied and checkpointed. */
  readonly finished: Deferred.Deferred<void>
  checkpoint(): Effect.Effect<string>
  setPaused(paused: boolean): void
}

const numel = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1)

export const runParamServer = (o: ParamServerOptions): Effect.Effect<ParamServerHandle, Error, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const { job, shard, id } = o
    const s = subjects(job.job)
    const reject = makeReporter(bus, s, id)
    const metrics = yield* currentMetrics
    const model = makeModel(job.model)
    const specs = shardSpecs(model.specs, job.topology.psShards, shard)
    const optimizer = resolveOptimizer(job.optimizer as never)
    if (Result.isFailure(optimizer)) return yield* Effect.fail(new Error(`optimizer: ${optimizer.failure.message}`))
    const schedule = resolveSchedule(job.schedule as unknown as ScheduleInput)
    if (Result.isFailure(schedule)) return yield* Effect.fail(new Error(`schedule: ${schedule.failure.message}`))
    const dir = job.train.checkpointDir

    // ---- state: from the newest valid checkpoint, or a fresh deterministic init
    const found =
      o.resume === false
        ? undefined
        : loadLatestCheckpoint(dir, job.job, shard, (path, why) => void Effect.runFork(Effect.logError(`skipping ${path}: ${why}`)))
    let state: ShardState
    if (found) {
      const c = found.checkpoint
      for (const sp of specs) {
        const p = c.params.get(sp.name)
        if (!p || p.length !== numel(sp.shape)) {
          return yield* Effect.fail(new Error(`checkpoint ${found.path} does not match the model: tensor ${sp.name} ${p ? `has ${p.length} values` : "is missing"}`))
        }
      }
      state = new ShardState({
        specs, params: new Map(specs.map((sp) => [sp.name, c.params.get(sp.name)!])), optimizer: optimizer.success,
        consistency: job.train.consistency, clipNorm: job.train.clipNorm, version: c.version, updates: c.updates,
        slots: new Map(specs.map((sp) => [sp.name, c.slots.get(sp.name) ?? {}])), appliedBatches: c.appliedBatches
      })
      yield* Effect.logInfo(`ps ${id}: resumed shard ${shard} at version ${c.version} from ${found.path}`)
    } else {
      const all = model.init(job.train.seed)
      state = new ShardState({
        specs, params: new Map(specs.map((sp) => [sp.name, all.get(sp.name)!])), optimizer: optimizer.success,
        consistency: job.train.consistency, clipNorm: job.train.clipNorm
      })
    }
    yield* Effect.logInfo(`ps ${id}: shard ${shard}/${job.topology.psShards} owns ${specs.length} tensors, ${specs.reduce((n, sp) => n + numel(sp.shape), 0)} params, ${job.train.consistency.mode}`)

    const hb = yield* runHeartbeat(s, "ps", id, job.train.heartbeatMs)
    hb.setInfo({ shard, version: state.version })
    const finished = yield* Deferred.make<void>()
    let paused = false
    /** told to stop: checkpointed, applies nothing more. */
    let stopped = false
    let done = state.version >= job.train.steps
    const minWorkers = o.minWorkers ?? job.topology.workers
    let started = state.version > 0

    const paramsBundle = (): TensorBundle => ({
      tensors: specs.map((sp) => ({ name: sp.name, dtype: "float32" as const, shape: sp.shape, data: state.params.get(sp.name)! })),
      meta: { kind: "params", job: job.job, version: state.version, step: state.version, sender: id, codec: "f32", extra: { shard } }
    })

    const checkpoint = Effect.sync(() =>
      writeCheckpoint(dir, {
        job: job.job, shard, version: state.version, updates: state.updates, optimizer: state.optimizer.config,
        appliedBatches: state.applied(), params: state.params, shapes: new Map(specs.map((sp) => [sp.name, sp.shape])), slots: state.slots
      })
    ).pipe(Effect.tap((p) => Effect.logInfo(`ps ${id}: checkpoint ${p}`)))

    const lrFor = (step: number) =>
      bus.request(s.lr, encodeMessage({ _tag: "GetLr", v: PROTOCOL_VERSION, step }), { timeoutMs: 1_000 }).pipe(
        Effect.flatMap((m) => Effect.fromResult(decodeBytes(LrForStep, m.subject, m.data))),
        Effect.map((r) => r.lr),
        Effect.catch(() => Effect.sync(() => lrAt(schedule.success, step)))
      )

    const membership = yield* trackMembership(s, job.train.livenessMs, (e) =>
      Effect.gen(function* () {
        if (e.member.role !== "worker") return
        if (e.kind === "left") {
          state.dropMember(e.member.id)
          yield* Effect.logInfo(`ps ${id}: worker ${e.member.id} left (${e.why}); barrier waits for [${state.waitingFor()}]`)
          yield* tryApply
        } else if (!started) {
          // before the first update every live worker is in the barrier; later, a worker
          // that joins is in the barrier of the next version
          state.openBarrier(membership.live("worker").map((m) => m.id))
        }
      })
    )

    // One apply at a time. tryApply is called from several fibers (gradients, membership,
    // control) and yields (the LR request) between `ready()` and `apply()`: without the
    // lock a second caller passed the same check and applied again with nothing pending —
    // a zero-gradient step past the last version (seen over NATS: shard 0 at version 4 of 3).
    const applyLock = Semaphore.makeUnsafe(1)
    // sync with several shards: shard 0 decides each version's senders, the others follow
    // (aggregate.ts `follow`), so all shards apply the same batches to the same version
    const following = shard > 0 && job.topology.psShards > 1
    if (following) state.follow()
    const tryApply: Effect.Effect<void> = applyLock.withPermit(Effect.suspend(() => {
      if (done || paused || !state.ready()) return Effect.void
      if (!started && !following) {
        const live = membership.live("worker").map((m) => m.id)
        if (live.length < minWorkers) return Effect.void
        started = true
      }
      return Effect.gen(function* () {
        const t0 = performance.now()
        const lr = yield* lrFor(state.version)
        const step = yield* Effect.sync(() => state.apply(lr)).pipe(
          Effect.withSpan("ps.aggregate_apply", { attributes: { "flotilla.shard": shard, "flotilla.version": state.version } })
        )
        for (const p of state.dropped) {
          yield* reject({ code: "stale", reason: `shard 0 applied version ${step.version} without this gradient (batch ${p.batchId})`, subject: s.psPush(shard), sender: p.sender, step: p.version })
        }
        done = step.version >= job.train.steps
        hb.setInfo({ shard, version: state.version })
        if (state.consistency.mode === "sync") state.openBarrier(membership.live("worker").map((m) => m.id))
        const sent = yield* sendBundle(bus, s.psVersion(shard), paramsBundle()).pipe(Effect.orDie, Effect.withSpan("ps.broadcast_version"))
        const ev: StepApplied = {
          _tag: "StepApplied", v: PROTOCOL_VERSION, shard, version: step.version, batchIds: step.batchIds, contributors: step.contributors,
          samples: step.samples, tokens: step.tokens, loss: step.loss, lr: step.lr, gradNorm: Number.isFinite(step.gradNorm) ? step.gradNorm : -1,
          maxStaleness: step.maxStaleness, aggregateMs: performance.now() - t0, at: Date.now(), final: done
        }
        yield* bus.publish(s.psApplied(shard), encodeMessage(ev)).pipe(Effect.orDie)
        metrics.addSteps()
        metrics.recordLearningRate(step.lr)
        metrics.recordStaleness(step.maxStaleness)
        metrics.recordStepTimes({ aggregate: ev.aggregateMs })
        metrics.addBytes("sent", sent.bytes, "params")
        if (done || (job.train.checkpointEvery > 0 && step.version % job.train.checkpointEvery === 0)) yield* checkpoint
        if (done) yield* Deferred.succeed(finished, undefined)
      })
    }))

    if (following) {
      yield* bus.subscribe(s.psApplied(0), (m) => {
        const r = decodeBytes(StepApplied, m.subject, m.data)
        if (Result.isFailure(r)) return Effect.logWarning(r.failure.message)
        state.decided(r.success.version, r.success.contributors)
        return tryApply
      })
    }

    const onGrads = (bundle: TensorBundle, info: { readonly subject: string; readonly bytes: number }) =>
      Effect.gen(function* () {
        const m = bundle.meta
        metrics.addBytes("received", info.bytes, m.kind)
        if (m.kind !== "grads" || m.job !== job.job) {
          yield* reject({ code: "bad-message", reason: `expected a grads bundle of job ${job.job}, got ${m.kind} of ${m.job}`, subject: info.subject, sender: m.sender })
          return
        }
        if (done) {
          yield* reject({ code: "stale", reason: `the job finished at version ${state.version}`, subject: info.subject, sender: m.sender, step: m.version })
          return
        }
        const grads = new Map<string, Float32Array>()
        for (const t of bundle.tensors) grads.set(t.name, fromWire(t))
        const extra = m.extra ?? {}
        const admitted = state.admit({
          sender: m.sender, version: m.version, batchId: m.batchId ?? "", samples: Number(extra.samples ?? 0),
          tokens: Number(extra.tokens ?? 0), loss: Number(extra.loss ?? Number.NaN), grads
        })
        if (!admitted.ok) {
          yield* reject({ code: admitted.code, reason: admitted.reason, subject: info.subject, sender: m.sender, step: m.version })
          // a refused push may release its sender from the sync barrier (aggregate.ts admit)
          yield* tryApply
          return
        }
        yield* tryApply
      })

    yield* receiveBundles(bus, s.psPush(shard), onGrads, {
      onError: (e, info) => reject({ code: "wire", reason: e.message, subject: info.subject }).pipe(Effect.asVoid)
    })

    yield* bus.subscribe(s.psPull(shard), (m: BusMessage) =>
      Effect.gen(function* () {
        const r = decodeBytes(PullParams, m.subject, m.data)
        if (Result.isFailure(r)) {
          yield* reject({ code: "bad-message", reason: r.failure.reason, subject: m.subject }, m)
          return
        }
        yield* replyWithBundle(bus, m, paramsBundle())
      })
    )

    yield* Effect.addFinalizer(() => (done || stopped ? Effect.void : checkpoint.pipe(Effect.ignore)))

    const setPaused = (p: boolean) => {
      paused = p || stopped
      hb.setState(paused ? "paused" : "running")
      if (!paused) Effect.runFork(tryApply)
    }
    yield* onControl(s, {
      pause: () => Effect.sync(() => setPaused(true)),
      resume: () => Effect.sync(() => setPaused(false)),
      // under the apply lock: an update in flight finishes first, so the checkpoint holds it
      checkpoint: () => applyLock.withPermit(checkpoint),
      stop: () =>
        applyLock.withPermit(
          Effect.gen(function* () {
            setPaused(true)
            if (!done && !stopped) yield* checkpoint
            stopped = true
          })
        ),
      // new hyperparameters, same slots (setHyperparams refuses a change of state layout)
      "set-optimizer": (c) =>
        Effect.gen(function* () {
          const next = setHyperparams(state.optimizer.config, c.patch as OptimizerPatch)
          if (Result.isFailure(next)) return yield* Effect.logError(`ps ${id}: set-optimizer: ${next.failure.message}`)
          state.optimizer = makeOptimizer(next.success)
          yield* Effect.logInfo(`ps ${id}: optimizer → ${JSON.stringify(next.success)}`)
        }),
      "set-consistency": (c) =>
        Effect.gen(function* () {
          state.consistency = c.mode === "bounded" ? { mode: "bounded", staleness: c.staleness ?? 0 } : { mode: c.mode }
          if (c.mode === "sync") state.openBarrier(membership.live("worker").map((m) => m.id))
          yield* Effect.logInfo(`ps ${id}: consistency → ${JSON.stringify(state.consistency)}`)
          yield* tryApply
        })
    })

    return {
      state,
      finished,
      checkpoint: () => checkpoint,
      setPaused
    } satisfies ParamServerHandle
  })
