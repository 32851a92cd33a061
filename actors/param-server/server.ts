/**
 * Implements: the parameter-server actor for one shard of tensors — the effectful shell
 * around the mailbox reducer (core.ts).
 *
 * Owns: the shard's state (built from the newest valid checkpoint, or a fresh init), its
 * incarnation, its checkpoints (checkpoint.ts). Every input — gradient bundles on
 * `ps.<k>.push`, pulls, applied-log and decision requests, membership, peer shards'
 * heartbeats and messages, LR replies, control commands, a Tick every TICK_MS — becomes
 * one event on one queue; one fiber runs the reducer on each and performs its effects in
 * order (publish, reply, broadcast params, checkpoint, roll back). The LR of step v is asked
 * of the scheduler (`lr`) in a fiber of this scope that enqueues the answer; with no
 * scheduler it is computed from the scheduler state this shard holds.
 * Run alone: `flotilla launch param-server --job FILE --shard K`.
 */
import { Deferred, Effect, Option, Queue, Ref, Result, Schedule, Scope, type Tracer } from "effect"
import { Bus, type BusMessage } from "../../shared/bus/Bus.ts"
import { onControl } from "../../shared/actor/control-listener.ts"
import { runHeartbeat, trackMembership } from "../../shared/actor/membership.ts"
import { makeReporter } from "../../shared/actor/report.ts"
import type { JobConfig } from "../../shared/config/job.ts"
import { modelForJob, trainableNames } from "../../shared/models/zoo.ts"
import { makeOptimizer, type OptimizerSlots } from "../../shared/optim/optimizers.ts"
import { initialWeights } from "./init.ts"
import { resolve } from "node:path"
import { resolveOptimizer } from "../../shared/optim/optimizers.ts"
import { CONTROL_VERBS, type CommandVerb } from "../../shared/protocol/control.ts"
import { decodeBytes, decodeValue, encodeMessage } from "../../shared/protocol/decode.ts"
import { GetDecision, GradientsHeld, GradMeta, Heartbeat, LrForStep, NormShare, PullParams, GetAppliedLog, StepDecided } from "../../shared/protocol/messages.ts"
import { bundleLimits, shardOfForJob } from "../../shared/models/pipeline.ts"
import { gradMetaProblem } from "../../shared/protocol/limits.ts"
import { senderOfMessageId } from "../../shared/wire/budget.ts"
import { isToken, PROTOCOL_VERSION, senderProblem, subjectSender, subjects } from "../../shared/protocol/subjects.ts"
import { resolveSchedule, type ScheduleInput } from "../../shared/schedule/schedules.ts"
import { initialState as initialSchedulerState, lrFrom, parseState } from "../../shared/schedule/state.ts"
import { currentMetrics } from "../../shared/telemetry/metrics.ts"
import { denseOfWire } from "../../shared/wire/rows.ts"
import type { TensorBundle } from "../../shared/wire/tensor.ts"
import { receiveBundles, replyWithBundle, sendBundle } from "../../shared/wire/transport.ts"
import { AppliedLog } from "../../shared/protocol/applied-log.ts"
import { ShardState } from "./aggregate.ts"
import { makeFileStore, type CheckpointStoreShape } from "../../shared/checkpoint/store.ts"
import { loadCheckpoint, saveCheckpoint, type ShardCheckpoint } from "./checkpoint.ts"
import { initialState, step, type PsEffect, type PsEvent, type PsState } from "./core.ts"
import { ParamServerClient, paramsBundle } from "./protocol.ts"
import { LoaderClient } from "../loader/protocol.ts"

export interface ParamServerOptions {
  readonly job: JobConfig
  readonly shard: number
  readonly id: string
  /** resume from the newest valid checkpoint (default true); false = a fresh run, earlier checkpoints of this shard are removed. */
  readonly resume?: boolean
  /** the first version waits until this many workers are live (default topology.workers). */
  readonly minWorkers?: number
  /** where checkpoints go; default files under job.train.checkpointDir. */
  readonly store?: CheckpointStoreShape
}

export interface ParamServerHandle {
  /** the shard's live arithmetic state (read-only for callers: the mailbox fiber owns it). */
  readonly state: ShardState
  /** the whole mailbox state (read-only). */
  readonly actor: () => PsState
  /** completes when the job's last step is applied and checkpointed. */
  readonly finished: Deferred.Deferred<void>
}

/** How often the mailbox gets a Tick (re-sends, overdue decisions). */
export const TICK_MS = 250

const numel = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1)

export const runParamServer = (o: ParamServerOptions): Effect.Effect<ParamServerHandle, Error, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const scope = yield* Effect.scope
    const { job, shard, id } = o
    const s = subjects(job.job)
    const reject = makeReporter(bus, s, id)
    const metrics = yield* currentMetrics
    const model = modelForJob(job)
    // a pipeline job's shards each hold one stage's tensors (shared/models/pipeline.ts)
    const shardOf = yield* Effect.try({ try: () => shardOfForJob(job, model), catch: (e) => new Error(`topology: ${e instanceof Error ? e.message : String(e)}`) })
    const specs = model.specs.filter((sp) => shardOf.get(sp.name) === shard)
    if (specs.length === 0) return yield* Effect.fail(new Error(`shard ${shard} of ${job.topology.psShards} owns no tensor of this model: use fewer shards`))
    const trainable = new Set(trainableNames(job, model))
    const specShapes = new Map(specs.map((sp) => [sp.name, sp.shape]))
    const optimizer = resolveOptimizer(job.optimizer as never)
    if (Result.isFailure(optimizer)) return yield* Effect.fail(new Error(`optimizer: ${optimizer.failure.message}`))
    const optimizerOf = makeOptimizer(optimizer.success)
    const schedule = resolveSchedule(job.schedule as unknown as ScheduleInput)
    if (Result.isFailure(schedule)) return yield* Effect.fail(new Error(`schedule: ${schedule.failure.message}`))
    const store = o.store ?? makeFileStore(job.train.checkpointDir)
    const logCorrupt = (path: string, why: string) => Effect.logError(`ps ${id}: skipping checkpoint ${path}: ${why}`)

    /** The job's initial params (every tensor): its seeded init, or `init.from`'s weights checked against the model. */
    let initial: { params: Map<string, Float32Array>; slots?: Map<string, OptimizerSlots>; from?: string } | undefined
    const initialParams = Effect.suspend(() => (initial ? Effect.succeed(initial) : initialWeights(model, job.train.seed, job.init, store).pipe(Effect.tap((w) => Effect.sync(() => void (initial = w))))))

    /** Shard state from a checkpoint (checked against the model), or the job's initial params. */
    const fromCheckpoint = (c: ShardCheckpoint | undefined): Effect.Effect<{ core: ShardState; schedule: unknown }, Error> =>
      Effect.gen(function* () {
        if (!c) {
          const init = yield* initialParams
          const slots = init.slots
          const core = new ShardState({
            specs, params: new Map(specs.map((sp) => [sp.name, Float32Array.from(init.params.get(sp.name)!)])), optimizer: optimizer.success,
            consistency: job.train.consistency, clipNorm: job.train.clipNorm, trainable,
            ...(slots ? { slots: new Map(specs.filter((sp) => trainable.has(sp.name)).map((sp) => [sp.name, slots.get(sp.name) ?? optimizerOf.initState(numel(sp.shape))])) } : {})
          })
          return { core, schedule: shard === 0 ? initialSchedulerState(schedule.success) : undefined }
        }
        // a LoRA job's checkpoints hold only what it trains: the frozen base comes from its init
        const base = specs.some((sp) => !c.params.has(sp.name) && !trainable.has(sp.name)) ? (yield* initialParams).params : undefined
        for (const sp of specs) {
          const p = c.params.get(sp.name) ?? (trainable.has(sp.name) ? undefined : base?.get(sp.name))
          if (!p || p.length !== numel(sp.shape)) {
            return yield* Effect.fail(new Error(`checkpoint of version ${c.version} does not match the model: tensor ${sp.name} ${p ? `has ${p.length} values` : "is missing"}`))
          }
        }
        const core = new ShardState({
          specs, params: new Map(specs.map((sp) => [sp.name, c.params.get(sp.name) ?? Float32Array.from(base!.get(sp.name)!)])), optimizer: c.optimizer,
          consistency: c.consistency, clipNorm: job.train.clipNorm, version: c.version, updates: c.updates, trainable,
          slots: new Map(specs.filter((sp) => trainable.has(sp.name)).map((sp) => [sp.name, c.slots.get(sp.name) ?? {}])), log: AppliedLog.fromJSON(c.log)
        })
        return { core, schedule: c.schedule }
      })

    if (o.resume === false) yield* store.clear(job.job, shard)
    const found = o.resume === false ? undefined : yield* loadCheckpoint(store, job.job, shard, Infinity, logCorrupt)
    const init = yield* fromCheckpoint(found?.checkpoint)
    const incarnation = Date.now()
    const state = initialState(
      {
        subjects: s, job: job.job, id, shard, shards: job.topology.psShards, steps: job.train.steps, epochs: job.train.epochs, checkpointEvery: job.train.checkpointEvery,
        minWorkers: o.minWorkers ?? job.topology.workers, decisionWaitMs: Math.max(1_000, 4 * job.train.heartbeatMs), resendMs: 500,
        joinGraceMs: job.train.livenessMs, compression: job.train.compression
      },
      init.core,
      { incarnation, schedule: init.schedule, now: Date.now(), codecSwitches: found?.checkpoint.codecSwitches, run: found?.checkpoint.run }
    )
    yield* Effect.logInfo(
      found
        ? `ps ${id}: resumed shard ${shard} at version ${state.core.version} from ${found.path} (incarnation ${incarnation})`
        : `ps ${id}: shard ${shard} starts fresh at version 0${initial?.from ? ` from the weights of ${initial.from}` : ""} (incarnation ${incarnation})`
    )
    if (trainable.size < model.specs.length) {
      const n = specs.filter((sp) => trainable.has(sp.name)).reduce((m, sp) => m + numel(sp.shape), 0)
      yield* Effect.logInfo(`ps ${id}: trains ${specs.filter((sp) => trainable.has(sp.name)).length} of its ${specs.length} tensors (${n} params); the rest are frozen`)
    }
    yield* Effect.logInfo(`ps ${id}: shard ${shard}/${job.topology.psShards} owns ${specs.length} tensors, ${specs.reduce((n, sp) => n + numel(sp.shape), 0)} params, ${state.core.consistency.mode}`)

    const finished = yield* Deferred.make<void>()
    // each event travels with the span it arrived in (a gradient's receive span, ...), so an
    // update it causes is in the pushing worker's trace
    const queue = yield* Queue.unbounded<{ readonly e: PsEvent; readonly span?: Tracer.AnySpan }>()
    const offer = (e: PsEvent, span?: Tracer.AnySpan) => Effect.sync(() => void Queue.offerUnsafe(queue, { e, span }))
    const offerTraced = (e: PsEvent) =>
      Effect.flatMap(Effect.option(Effect.currentSpan), (sp) => offer(e, Option.getOrUndefined(sp)))
    const hb = yield* runHeartbeat(s, "ps", id, job.train.heartbeatMs)
    const setInfo = () => {
      hb.setInfo({ shard, version: state.core.version, incarnation: state.incarnation })
      hb.setState(state.paused ? "paused" : "running")
    }
    setInfo()

    // shard 0's checkpoints say what inference needs: the model block, and from the loader
    // the task, class names and tokenizer (asked once, in the background, until one answers)
    const dataInfo = yield* Ref.make<unknown>(undefined)
    if (shard === 0) {
      yield* Effect.forkScoped(
        LoaderClient.info(bus, s, id, 2_000).pipe(
          Effect.retry(Schedule.spaced(1_000)),
          Effect.flatMap((i) => Ref.set(dataInfo, { task: i.task, corpus: i.corpus, labels: i.labels, tokenizer: i.tokenizer })),
          Effect.ignore
        )
      )
    }

    // ---- effects
    const checkpoint = (why: string) =>
      saveCheckpoint(store, {
        job: job.job, shard, version: state.core.version, updates: state.core.updates, optimizer: state.core.optimizer.config,
        consistency: state.core.consistency, log: state.core.log.toJSON(), schedule: state.schedule, codecSwitches: state.codecSwitches, run: state.run,
        // init.from as an absolute path: merge-lora and export rebuild a LoRA job's base from it, from any folder
        data: shard === 0 ? { model: job.model, lora: job.train.lora, init: job.init && { ...job.init, from: job.init.from.startsWith("store:") ? job.init.from : resolve(job.init.from) }, seed: job.train.seed, ...(Ref.getUnsafe(dataInfo) ?? {}) } : undefined,
        // LoRA: only the adapters (the frozen base is the job's init, rebuilt on resume)
        params: job.train.lora ? new Map([...state.core.params].filter(([k]) => trainable.has(k))) : state.core.params,
        shapes: new Map(specs.filter((sp) => !job.train.lora || trainable.has(sp.name)).map((sp) => [sp.name, sp.shape])), slots: state.core.slots
      }).pipe(
        Effect.tap((r) => Effect.sync(() => void (savedVersion = r.version))),
        Effect.flatMap((r) => Effect.logInfo(`ps ${id}: checkpoint ${r.where} (${why})`))
      )
    /** the version of the newest checkpoint this process wrote (or resumed from). */
    let savedVersion = found ? state.core.version : -1

    // an LR reply outside [0, MAX_LR] (the schema's bound), or for another step, is refused
    // on errors and asked again; then, as with no scheduler, the shard computes the LR itself
    const lrFor = (version: number, epoch: number) =>
      bus.request(s.lr, encodeMessage({ _tag: "GetLr", v: PROTOCOL_VERSION, step: version, epoch, incarnation: state.incarnation, state: shard === 0 ? state.schedule : undefined }), { timeoutMs: 1_000 }).pipe(
        Effect.flatMap((m) => {
          const r = decodeBytes(LrForStep, m.subject, m.data)
          const why = Result.isFailure(r) ? r.failure.reason : r.success.step !== version ? `an LR reply for step ${r.success.step}, asked for ${version}` : undefined
          if (why === undefined && Result.isSuccess(r)) return Effect.succeed(r.success)
          return reject({ code: "invalid-value", reason: `LR reply refused (${why}); step ${version} uses the LR this shard computes if no valid one comes`, subject: s.lr, step: version }).pipe(Effect.andThen(Effect.fail(new Error(why))))
        }),
        Effect.retry({ times: 2 }),
        Effect.map((r) => ({ lr: r.lr, schedule: r.state })),
        // no scheduler: the LR its last known state gives (the job's schedule before any reply)
        Effect.catch(() => Effect.sync(() => ({ lr: lrFrom(parseState(state.schedule) ?? initialSchedulerState(schedule.success), version, epoch), schedule: undefined })))
      )

    let stepMs = 0 // how long the last reducer step took (the update's compute), for StepApplied
    const perform = (e: PsEffect, span: Tracer.AnySpan | undefined): Effect.Effect<void> => {
      switch (e._tag) {
        case "Publish": {
          const msg = (e.message as { _tag?: string })._tag === "StepApplied" ? { ...e.message, aggregateMs: stepMs, at: Date.now() } : e.message
          return bus.publish(e.subject, encodeMessage(msg)).pipe(Effect.ignore)
        }
        case "Reply":
          return bus.respond(e.to, encodeMessage(e.message)).pipe(Effect.ignore)
        case "ReplyParams":
          return replyWithBundle(bus, e.to, paramsBundle(state)).pipe(Effect.ignore)
        case "BroadcastParams":
          return sendBundle(bus, s.psVersion(shard), paramsBundle(state)).pipe(
            Effect.tap((sent) => Effect.sync(() => metrics.addBytes("sent", sent.bytes, "params"))),
            Effect.withSpan("ps.broadcast_version"),
            Effect.ignore
          )
        case "RequestLr":
          return Effect.asVoid(Effect.forkIn(lrFor(e.version, e.epoch).pipe(Effect.flatMap((r) => offer({ _tag: "LrResolved", version: e.version + 1, lr: r.lr, schedule: r.schedule }, span))), scope))
        case "RequestDecision":
          return Effect.asVoid(
            Effect.forkIn(ParamServerClient.decision(bus, s, e.version).pipe(Effect.flatMap((d) => offer({ _tag: "Decided", msg: d })), Effect.ignore), scope)
          )
        case "Reject":
          return reject(e.rejection, e.replyTo).pipe(
            Effect.flatMap((msg) => (e.ackTo ? bus.publish(s.psAck(shard, e.ackTo), encodeMessage(msg)).pipe(Effect.ignore) : Effect.void))
          )
        case "Applied":
          return Effect.sync(() => {
            metrics.addSteps()
            metrics.recordLearningRate(e.step.lr)
            metrics.recordStaleness(e.step.maxStaleness)
            metrics.recordStepTimes({ aggregate: stepMs })
          })
        case "Checkpoint":
          return checkpoint(e.why).pipe(Effect.catchCause((c) => Effect.logError(`ps ${id}: checkpoint failed`, c)))
        case "Rollback":
          return loadCheckpoint(store, job.job, shard, e.atMost, logCorrupt).pipe(
            Effect.flatMap((f) =>
              fromCheckpoint(f?.checkpoint).pipe(
                Effect.flatMap((r) => offer({ _tag: "Restored", core: r.core, schedule: r.schedule, incarnation: Date.now(), from: `${e.why}; ${f ? f.path : "no checkpoint at or below it: fresh init"}` }, span))
              )
            ),
            Effect.catchCause((c) => Effect.logError(`ps ${id}: rollback failed`, c))
          )
        case "Finished":
          return Deferred.succeed(finished, undefined).pipe(Effect.asVoid)
        case "Log":
          return e.level === "warn" ? Effect.logWarning(`ps ${id}: ${e.message}`) : Effect.logInfo(`ps ${id}: ${e.message}`)
      }
    }

    // a clean stop checkpoints what the mailbox reached, unless that version is saved already
    // (added before the mailbox fiber, so it runs after the fiber ends, even mid-effect)
    yield* Effect.addFinalizer(() => (savedVersion === state.core.version ? Effect.void : checkpoint("shutting down").pipe(Effect.ignore)))

    // ---- the mailbox: one fiber, one queue, the reducer, the effects in order
    yield* Effect.forkScoped(
      Effect.forever(
        Effect.gen(function* () {
          const { e, span } = yield* Queue.take(queue)
          const t0 = performance.now()
          const effects = step(state, e)
          stepMs = performance.now() - t0
          let run: Effect.Effect<void> = Effect.forEach(effects, (eff) => perform(eff, span), { discard: true })
          const applied = effects.find((x) => x._tag === "Applied")
          if (applied) run = run.pipe(Effect.withSpan("ps.aggregate_apply", { attributes: { "flotilla.shard": shard, "flotilla.version": applied.step.version, "flotilla.apply_ms": stepMs } }))
          yield* span ? Effect.withParentSpan(run, span) : run
          setInfo()
        })
      )
    )

    // ---- inputs: everything below only decodes at the edge and enqueues
    // the live workers' ids: their pushes are reassembled in the members' pool (shared/wire/budget.ts), the rest in a small shared one
    const knownSenders = new Set<string>()
    yield* trackMembership(s, job.train.livenessMs, (e) =>
      // a relayed worker (heartbeat info `relay`) counts for the first step but is waited for through its relay
      e.member.role !== "worker" ? Effect.void
      : Effect.sync(() => void (e.kind === "left" ? knownSenders.delete(e.member.id) : knownSenders.add(e.member.id))).pipe(Effect.andThen(offer(e.kind === "left" ? { _tag: "MemberLeft", id: e.member.id, why: e.why } : { _tag: "MemberJoined", id: e.member.id, ...(e.member.info?.relay !== undefined ? { relayed: true } : e.member.info?.relayFor !== undefined ? { relay: true } : {}) })))
    )
    yield* bus.subscribe(s.hbRole("ps"), (m) => {
      const hb = decodeBytes(Heartbeat, m.subject, m.data)
      if (Result.isFailure(hb) || hb.success.state === "leaving") return Effect.void
      const i = hb.success.info ?? {}
      const [k, inc, ver] = [Number(i.shard), Number(i.incarnation), Number(i.version)]
      return Number.isInteger(k) && Number.isFinite(inc) && Number.isInteger(ver) ? offer({ _tag: "PeerSeen", shard: k, incarnation: inc, version: ver }) : Effect.void
    })

    const onGrads = (bundle: TensorBundle, info: { readonly subject: string; readonly from: string; readonly bytes: number; readonly id: string }) =>
      Effect.gen(function* () {
        const m = bundle.meta
        metrics.addBytes("received", info.bytes, m.kind)
        const bad = (code: "bad-message" | "wrong-job" | "invalid-value" | "bad-tensor", reason: string) =>
          reject({ code, reason, subject: info.subject, sender: m.sender, messageId: info.id }).pipe(
            Effect.flatMap((msg) => (isToken(m.sender) ? bus.publish(s.psAck(shard, m.sender), encodeMessage(msg)).pipe(Effect.ignore) : Effect.void))
          )
        // the subject names its sender (only that sender's user may publish there, shared/bus/permissions.ts):
        // a bundle claiming another is refused, and the answer goes to the subject's sender
        const spoof = senderProblem(info.from, m.sender, "push")
        if (spoof !== undefined) {
          const named = subjectSender(info.from)
          return yield* reject({ code: "bad-message", reason: spoof, subject: info.from, sender: named, messageId: info.id }).pipe(
            Effect.flatMap((msg) => bus.publish(s.psAck(shard, named), encodeMessage(msg)).pipe(Effect.ignore))
          )
        }
        if (m.kind !== "grads") return yield* bad("bad-message", `expected a grads bundle, got ${m.kind}`)
        if (m.job !== job.job) return yield* bad("wrong-job", `expected job ${job.job}, got ${m.job}`)
        const g = decodeValue(GradMeta, `${info.subject} meta.extra`, m.extra ?? {})
        if (Result.isFailure(g)) return yield* bad("bad-message", g.failure.reason)
        const x = g.success
        // the numbers weigh it in the mean: held to the job's batch size (shared/protocol/limits.ts)
        const odd = gradMetaProblem(job, x, (m.batchId ?? x.micro).split("+").length)
        if (odd !== undefined) return yield* bad("invalid-value", odd)
        // an embedding's gradient may come as its non-zero rows (shared/wire/rows.ts)
        // any codec of the registry (the bundle says which, per tensor); an inconsistent one is refused with its reason
        const dense = denseOfWire(bundle.tensors, (n) => specShapes.get(n))
        if ("problem" in dense) return yield* bad("bad-tensor", dense.decode ? `cannot decode ${m.codec} gradient: ${dense.problem}` : dense.problem)
        const grads = dense.grads
        yield* offerTraced({
          _tag: "GradientsReceived", subject: info.subject, incarnation: x.incarnation,
          push: { sender: m.sender, version: m.version, batchId: m.batchId ?? x.micro, samples: x.samples, tokens: x.tokens, loss: x.loss, grads, epochBatches: x.epochBatches, normSq: x.normSq }
        })
      })
    yield* receiveBundles(bus, s.psPushAny(shard), onGrads, {
      ...bundleLimits(job, model),
      isKnownSender: (x) => knownSenders.has(x),
      onError: (e, info) => reject({ code: "wire", reason: e.message, subject: info.subject, sender: senderOfMessageId(info.id), ...(info.id !== undefined ? { messageId: info.id } : {}) }).pipe(Effect.asVoid)
    })

    const request = <A>(schema: Parameters<typeof decodeBytes>[0], subject: string, toEvent: (m: BusMessage, a: A) => PsEvent) =>
      bus.subscribe(subject, (m) => {
        const r = decodeBytes(schema, m.subject, m.data)
        return Result.isFailure(r) ? reject({ code: "bad-message", reason: r.failure.reason, subject: m.subject }, m).pipe(Effect.asVoid) : offerTraced(toEvent(m, r.success as A))
      })
    yield* request(PullParams, s.psPull(shard), (m) => ({ _tag: "PullRequested", reply: m }))
    yield* request(GetAppliedLog, s.psLog(shard), (m) => ({ _tag: "LogRequested", reply: m }))
    if (shard === 0) {
      yield* request<GetDecision>(GetDecision, s.psDecision, (m, d) => ({ _tag: "DecisionRequested", reply: m, version: d.version }))
      yield* bus.subscribe(s.psHeldAll, (m) => {
        const r = decodeBytes(GradientsHeld, m.subject, m.data)
        return Result.isSuccess(r) ? offerTraced({ _tag: "HeldReported", msg: r.success }) : Effect.logWarning(r.failure.message)
      })
    } else {
      yield* bus.subscribe(s.psDecided, (m) => {
        const r = decodeBytes(StepDecided, m.subject, m.data)
        return Result.isSuccess(r) ? offerTraced({ _tag: "Decided", msg: r.success }) : Effect.logWarning(r.failure.message)
      })
    }
    yield* bus.subscribe(s.psNormAll, (m) => {
      const r = decodeBytes(NormShare, m.subject, m.data)
      return Result.isSuccess(r) ? offerTraced({ _tag: "NormShared", msg: r.success }) : Effect.logWarning(r.failure.message)
    })
    const verbs: ReadonlyArray<CommandVerb> = ["pause", "resume", "checkpoint", "stop", "set-optimizer", "set-consistency", "set-compression"]
    yield* onControl(s, Object.fromEntries(verbs.filter((v) => (CONTROL_VERBS as readonly string[]).includes(v)).map((v) => [v, (_: unknown, ev: never) => offer({ _tag: "ControlApplied", event: ev })])), id)
    // (suspended: each Tick reads the clock when it is sent)
    yield* Effect.forkScoped(Effect.forever(Effect.sleep(TICK_MS).pipe(Effect.andThen(Effect.suspend(() => offer({ _tag: "Tick", now: Date.now() }))))))

    // announce this incarnation: workers waiting on the old one pick up these params at once
    yield* offer({ _tag: "Tick", now: Date.now() })
    yield* sendBundle(bus, s.psVersion(shard), paramsBundle(state)).pipe(Effect.ignore)
    return {
      get state() {
        return state.core
      },
      actor: () => state,
      finished
    } satisfies ParamServerHandle
  })
