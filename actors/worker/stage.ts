/**
 * Implements: the pipeline stage worker — stage k of replica r of a job with
 * `topology.stages` S > 1: the effectful shell around its mailbox reducer (stage-core.ts).
 * Hosts only its stage's blocks and params (the shards it reads: its own, and for the last
 * stage the shard of the tied embedding). Subjects: activations in on
 * `pipe.<replica>.<k>.fwd` and out on `pipe.<replica>.<k+1>.fwd`; activation gradients in
 * on `pipe.<replica>.<k>.bwd` and out on `pipe.<replica>.<k−1>.bwd` (the last stage's
 * tied-weight gradient to `pipe.<replica>.0.bwd`); gradients to its own shards as the
 * replica (`ps.<shard>.push.<replica>`, acks on `ps.<shard>.ack.<replica>`), each encoded under the
 * codec its shard stamped on the version, with this stage's error feedback (residuals kept
 * in `<checkpointDir>/<job>/senders/<id>.ef`, as a worker's); stage 0 leases the
 * micro-batches (as the replica), the last stage fetches their targets (`data.fetch`).
 * Stage 0 heartbeats as the replica's worker (the shards' barrier counts replicas); the
 * others as role `stage`. Run alone: `flotilla launch worker --stage K --replica R`.
 */
import { runsOf, serverPosition } from "./params-cache.ts"
import { Deferred, Effect, Queue, Result, Schedule, type Scope } from "effect"
import { Bus } from "../../shared/bus/Bus.ts"
import { onControl } from "../../shared/actor/control-listener.ts"
import { failpoint, isArmed } from "../../shared/actor/failpoint.ts"
import { runHeartbeat } from "../../shared/actor/membership.ts"
import { makeReporter } from "../../shared/actor/report.ts"
import type { JobConfig } from "../../shared/config/job.ts"
import { Compute } from "../../shared/compute/backend.ts"
import { batchProblem, type Batch as ModelBatch } from "../../shared/models/model.ts"
import * as tf from "@tensorflow/tfjs"
import { explainWasmAbort } from "../../shared/compute/memory.ts"
import { bundleLimits, freeLength, heapProblemFor, ownerStage, shapeBatch, shardOfForJob, stageBackward, stageForward, stageShards, stagesForJob, stageTensors, type Activation } from "../../shared/models/pipeline.ts"
import { modelForJob, trainableNames } from "../../shared/models/zoo.ts"
import { decodeBytes, decodeValue, encodeMessage } from "../../shared/protocol/decode.ts"
import { Heartbeat, PipeMeta, PushAck, Rejected, type ErrorCode, type StageStep } from "../../shared/protocol/messages.ts"
import { checkParams, paramsExpectation } from "../../shared/protocol/params-check.ts"
import { senderOfMessageId } from "../../shared/wire/budget.ts"
import { PROTOCOL_VERSION, subjects } from "../../shared/protocol/subjects.ts"
import { currentMetrics } from "../../shared/telemetry/metrics.ts"
import { GradEncoder, specOf } from "../../shared/wire/compression.ts"
import type { TensorBundle } from "../../shared/wire/tensor.ts"
import { SenderResiduals, tensorLengths } from "../../shared/checkpoint/sender-state.ts"
import { receiveBundles, sendBundle } from "../../shared/wire/transport.ts"
import { LoaderClient } from "../loader/protocol.ts"
import { ParamServerClient } from "../param-server/protocol.ts"
import { initialStage, step, type StageConfig, type StageEffect, type StageEvent, type StageState } from "./stage-core.ts"
import type { LeasedBatch } from "./stage-run.ts"

export interface StageOptions {
  readonly job: JobConfig
  /** the replica (stage 0's id; every stage of it pushes as it). */
  readonly replica: string
  readonly stage: number
  /** this process's id (default: the replica for stage 0, `<replica>-s<k>` otherwise). */
  readonly id?: string
}

export interface StageHandle {
  readonly finished: Deferred.Deferred<void>
  readonly state: StageState
}

const TICK_MS = 100

const mb = (b: number) => `${Math.round(b / 2 ** 20)} MB`
/** rss, JS heap, array buffers and the wasm heap, for the state line. */
const memoryLine = (): string => {
  const m = process.memoryUsage()
  const wasm = tf.getBackend() === "wasm" ? (tf.backend() as unknown as { wasm?: { HEAPU8?: Uint8Array } }).wasm?.HEAPU8?.length : undefined
  return `rss ${mb(m.rss)}, js ${mb(m.heapUsed)}, buffers ${mb(m.arrayBuffers)}${wasm !== undefined ? `, wasm heap ${mb(wasm)}` : ""}`
}

/** The id of stage k of a replica. */
export const stageId = (replica: string, stage: number): string => (stage === 0 ? replica : `${replica}-s${stage}`)

/** Stage k's reducer config for a job (throws with the reason when the cut cannot run). */
export const stageConfig = (job: JobConfig, replica: string, k: number, id: string): StageConfig => {
  const model = modelForJob(job)
  const S = job.topology.stages
  if (!(Number.isInteger(k) && k >= 0 && k < S)) throw new Error(`--stage must be in [0, ${S}) for this job, got ${k}`)
  const stages = stagesForJob(job, model)
  const st = stages[k]
  const owner = ownerStage(stages)
  const shardOf = shardOfForJob(job, model)
  const trainable = new Set(trainableNames(job, model))
  const { reads, owns } = stageShards(job, model, k)
  const foreign = st.params.filter((p) => owner.get(p.name) !== k)
  if (foreign.some((p) => owner.get(p.name) !== 0) || (foreign.length > 0 && k !== S - 1)) {
    throw new Error(`stage ${k} reads ${foreign.map((p) => p.name).join(", ")} owned by another stage: only weights tied between the first and the last stage are exchanged`)
  }
  const last = stages[S - 1]
  const tied = k === S - 1 ? foreign.filter((p) => trainable.has(p.name)) : k === 0 ? st.params.filter((p) => owner.get(p.name) === 0 && trainable.has(p.name) && last.params.some((q) => q.name === p.name)) : []
  const pushes = new Map(owns.map((sh) => [sh, model.specs.filter((sp) => shardOf.get(sp.name) === sh && trainable.has(sp.name))]))
  return {
    id, replica, job: job.job, stage: k, stages: S, micros: job.topology.microBatches, schedule: job.topology.schedule,
    reads, pushes, tied: tied.map((p) => ({ name: p.name, shape: p.shape })), steps: job.train.steps,
    ackTimeoutMs: Math.max(1_000, 4 * job.train.heartbeatMs), watchdogMs: Math.max(2_000, 4 * job.train.heartbeatMs),
    stepTimeoutMs: job.train.livenessMs
  }
}

export const runStageWorker = (o: StageOptions): Effect.Effect<StageHandle, Error, Bus | Compute | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    yield* Compute
    const scope = yield* Effect.scope
    const { job, replica } = o
    const k = o.stage
    const id = o.id ?? stageId(replica, k)
    const s = subjects(job.job)
    const model = modelForJob(job)
    const cfg = yield* Effect.try({ try: () => stageConfig(job, replica, k, id), catch: (e) => (e instanceof Error ? e : new Error(String(e))) })
    const S = cfg.stages
    const st = stagesForJob(job, model)[k]
    // the wasm heap is 32-bit: a stage too big for it is refused with the reason, before it corrupts memory
    const heap = tf.getBackend() === "wasm" ? heapProblemFor(job, model, st) : undefined
    if (heap !== undefined) return yield* Effect.fail(new Error(heap))
    const trainable = new Set(trainableNames(job, model))
    const reject = makeReporter(bus, s, id)
    const metrics = yield* currentMetrics
    const finished = yield* Deferred.make<void>()
    const queue = yield* Queue.unbounded<StageEvent>()
    const offer = (e: StageEvent) => Effect.sync(() => void Queue.offerUnsafe(queue, e))
    yield* Effect.logInfo(`stage ${id}: stage ${k} of ${S} (${st.blocks.map((b) => b.name).join(", ")}; ${st.params.reduce((n, p) => n + p.shape.reduce((a, b) => a * b, 1), 0)} params), replica ${replica}, shards read [${cfg.reads}], pushes to [${[...cfg.pushes.keys()]}], ${cfg.schedule} with ${cfg.micros} micro-batches${cfg.tied.length > 0 ? `, tied: ${cfg.tied.map((t) => t.name).join(", ")}` : ""}`)

    // ---- params of the shards this stage reads: checked (shared/protocol/params-check.ts), then believed or not (params-cache.ts)
    const needed = new Set(st.params.map((p) => p.name))
    const expect = paramsExpectation(job, model.specs, shardOfForJob(job, model), cfg.reads)
    const refuseParams = (r: { reason: string; code?: ErrorCode; subject: string; sender?: string; version?: number; messageId?: string }) =>
      reject({ code: r.code ?? "invalid-value", reason: r.reason, subject: r.subject, ...(r.sender !== undefined ? { sender: r.sender } : {}), ...(r.version !== undefined ? { step: r.version } : {}), ...(r.messageId !== undefined ? { messageId: r.messageId } : {}) }).pipe(Effect.asVoid)
    const paramsEvent = (b: TensorBundle, from: { source: "broadcast" | "pull"; subject: string; shard: number; id?: string }): Effect.Effect<StageEvent | undefined> => {
      const c = checkParams(b, expect, Date.now(), from.shard)
      if (!c.ok) return refuseParams({ ...c, subject: from.subject, sender: b.meta.sender, version: b.meta.version, messageId: from.id }).pipe(Effect.as(undefined))
      // a shard of another stage (the tied embedding's): keep copies of what this stage reads, so the bundle's buffer can go
      const own = cfg.pushes.has(c.meta.shard)
      const params = new Map([...c.params].filter(([n]) => own || needed.has(n)).map(([n, v]) => [n, own || b.tensors.find((t) => t.name === n)!.dtype !== "float32" ? v : Float32Array.from(v)]))
      return Effect.succeed({
        _tag: "ParamsReceived", shard: c.meta.shard, incarnation: c.meta.incarnation, version: b.meta.version, codec: c.meta.codec, run: c.meta.run,
        params, source: from.source, sender: b.meta.sender, ...(from.id !== undefined ? { messageId: from.id } : {})
      })
    }
    const limits = bundleLimits(job, model)
    for (const sh of cfg.reads) {
      yield* receiveBundles(bus, s.psVersion(sh), (b, info) => paramsEvent(b, { source: "broadcast", subject: info.subject, shard: sh, id: info.id }).pipe(Effect.flatMap((e) => (e ? offer(e) : Effect.void))), {
        ...limits,
        onError: (e, info) => refuseParams({ code: "wire", reason: e.message, subject: info.subject, sender: senderOfMessageId(info.id), ...(info.id !== undefined ? { messageId: info.id } : {}) })
      })
    }
    const pulled = (sh: number, b: TensorBundle) => paramsEvent(b, { source: "pull", subject: s.psPull(sh), shard: sh }).pipe(Effect.flatMap((e) => offer(e ?? { _tag: "PullEnded", shard: sh })))
    const pull = (sh: number, minVersion: number) =>
      ParamServerClient.pull(bus, s, sh, id, minVersion, 60_000, limits).pipe(
        Effect.flatMap((r) => pulled(sh, r.bundle)),
        Effect.catch((e) => Effect.logDebug(`stage ${id}: pull of shard ${sh}: ${e.message}`).pipe(Effect.andThen(offer({ _tag: "PullEnded", shard: sh }))))
      )
    yield* bus.subscribe(s.hbRole("ps"), (m) => {
      const hb = decodeBytes(Heartbeat, m.subject, m.data)
      const seen = Result.isSuccess(hb) ? serverPosition(hb.success) : undefined
      return seen ? offer(seen) : Effect.void
    })
    for (const sh of cfg.pushes.keys()) {
      yield* bus.subscribe(s.psAck(sh, replica), (m) => {
        const a = decodeBytes(PushAck, m.subject, m.data)
        if (Result.isSuccess(a)) return offer({ _tag: "PushAcked", ack: a.success })
        const r = decodeBytes(Rejected, m.subject, m.data)
        return Result.isSuccess(r) ? offer({ _tag: "PushRefused", rejected: r.success, shard: sh }) : Effect.logWarning(`stage ${id}: bad ack on ${m.subject}`)
      })
    }

    // ---- the pipe: what arrives is checked against this stage before it is an event; a bad one is reported to its sender
    const bad = (b: TensorBundle, subject: string, reason: string) =>
      reject({ code: "bad-tensor", reason, subject, sender: b.meta.sender, step: b.meta.version }).pipe(Effect.asVoid)
    const pipeMeta = (b: TensorBundle) => decodeValue(PipeMeta, "pipe meta", b.meta.extra ?? {})
    const activation = (b: TensorBundle, name: string): Activation | string => {
      const t = b.tensors.find((x) => x.name === name)
      if (!t || t.dtype !== "float32" || b.tensors.length !== 1) return `expected one float32 tensor "${name}", got [${b.tensors.map((x) => `${x.name}:${x.dtype}`)}]`
      return { data: t.data as Float32Array, shape: t.shape }
    }
    if (k > 0) {
      yield* receiveBundles(bus, s.pipeFwd(replica, k), (b, info) => {
        const m = pipeMeta(b)
        if (b.meta.kind !== "activation" || b.meta.job !== job.job) return bad(b, info.subject, `expected an activation of job ${job.job}, got ${b.meta.kind} of ${b.meta.job}`)
        if (Result.isFailure(m)) return bad(b, info.subject, m.failure.reason)
        const x = activation(b, "x")
        const p = m.success
        if (typeof x === "string") return bad(b, info.subject, x)
        if (p.micro === undefined || p.microBatch === undefined || p.rows === undefined || p.length === undefined) return bad(b, info.subject, "an activation names its micro-batch, rows and length")
        if (x.shape[0] % p.rows !== 0) return bad(b, info.subject, `activation [${x.shape}] does not have ${p.rows} rows`)
        return offer({
          _tag: "ActivationReceived", version: b.meta.version, attempt: p.attempt, stepId: b.meta.batchId ?? "", micro: p.micro, micros: p.micros,
          meta: { batchId: p.microBatch, rows: p.rows, length: p.length, units: p.units ?? 0, gen: p.gen ?? 0, epochBatches: p.epochBatches ?? 0 }, x
        })
      })
    }
    if (k < S - 1) {
      yield* receiveBundles(bus, s.pipeBwd(replica, k), (b, info) => {
        const m = pipeMeta(b)
        if (b.meta.job !== job.job) return bad(b, info.subject, `job ${b.meta.job}, expected ${job.job}`)
        if (Result.isFailure(m)) return bad(b, info.subject, m.failure.reason)
        const p = m.success
        if (b.meta.kind === "tied-grad") {
          if (k !== 0) return bad(b, info.subject, `tied gradients go to stage 0, this is stage ${k}`)
          const grads = new Map<string, Float32Array>()
          for (const t of cfg.tied) {
            const g = b.tensors.find((x) => x.name === t.name)
            if (!g || g.dtype !== "float32" || g.data.length !== t.shape.reduce((a, c) => a * c, 1)) return bad(b, info.subject, `tied gradient ${t.name} [${t.shape}] missing or of the wrong size`)
            grads.set(t.name, g.data as Float32Array)
          }
          return offer({ _tag: "TiedReceived", version: b.meta.version, attempt: p.attempt, stepId: b.meta.batchId ?? "", grads })
        }
        if (b.meta.kind !== "activation-grad") return bad(b, info.subject, `expected an activation-grad or tied-grad, got ${b.meta.kind}`)
        const dy = activation(b, "dx")
        if (typeof dy === "string") return bad(b, info.subject, dy)
        if (p.micro === undefined || p.loss === undefined) return bad(b, info.subject, "an activation gradient names its micro-batch and loss")
        return offer({ _tag: "GradientReceived", version: b.meta.version, attempt: p.attempt, stepId: b.meta.batchId ?? "", micro: p.micro, dy, loss: p.loss })
      })
    }
    yield* onControl(s, { stop: () => offer({ _tag: "StopRequested" }) }, id)
    const hb = yield* runHeartbeat(s, k === 0 ? "worker" : "stage", id, job.train.heartbeatMs)
    hb.setInfo({ replica, stage: k })

    const state = initialStage(cfg, Date.now())

    // ---- the gradient's codec: each push is encoded under the codec its shard stamped on the
    // version (train.compression, ctl set-compression), with this stage's error feedback; the
    // residuals are saved with the checkpoint cadence and on a clean exit, and restored into the same run only
    const encoder = new GradEncoder(job.train.compression.minElements)
    const senderState = new SenderResiduals(job, id, encoder.residuals, shardOfForJob(job, model), tensorLengths(model.specs))
    if (senderState.corrupt) yield* Effect.logWarning(`stage ${id}: ${senderState.corrupt}; starting with zero residuals`)
    const saveResiduals = (version: number) =>
      Effect.suspend(() => { const err = senderState.trySave(version, runsOf(state)); return err ? Effect.logWarning(`stage ${id}: ${err}`) : Effect.void })
    yield* Effect.addFinalizer(() => saveResiduals(Math.max(0, senderState.lastSaved)).pipe(Effect.ignore))
    /** encoded pushes by shard, version and step: a resend, or attempt a+1 of the same step, sends these bytes again */
    const encoded = new Map<string, TensorBundle>()
    const encodePush = (sh: number, b: TensorBundle): { bundle: TensorBundle; restored?: string } => {
      const key = `${sh}:${b.meta.version}:${b.meta.batchId}`
      const done = encoded.get(key)
      if (done) return { bundle: done }
      const restored = senderState.restore((x) => state.cache.get(x)?.run)
      const codec = specOf(b.meta.codec ?? "f32")
      const bundle = { meta: b.meta, tensors: b.tensors.flatMap((t) => encoder.encode(codec, t.name, t.shape, t.data as Float32Array)) }
      for (const old of encoded.keys()) if (Number(old.split(":")[1]) < b.meta.version - 2) encoded.delete(old)
      encoded.set(key, bundle)
      return { bundle, ...(restored !== undefined ? { restored } : {}) }
    }

    // ---- effects
    // the stage's params as tensors, per shard, built once per params version and reused by every op
    // on it; the arrays they came from are then let go (a big stage would otherwise hold its params twice)
    const resident = new Map<number, { key: string; tensors: Map<string, tf.Tensor> }>()
    const paramsNow = (): ReadonlyMap<string, tf.Tensor> => {
      const all = new Map<string, tf.Tensor>()
      for (const sh of cfg.reads) {
        const c = state.cache.get(sh)
        const key = `${c?.incarnation}:${c?.version}`
        let r = resident.get(sh)
        if (r?.key !== key) {
          if (r) for (const t of r.tensors.values()) t.dispose()
          const part = { ...st, params: st.params.filter((p) => c?.params.has(p.name)) }
          r = { key, tensors: stageTensors(part, c?.params ?? new Map()) }
          resident.set(sh, r)
          if (c && c.params.size > 0 && [...c.params.keys()].every((n) => needed.has(n))) (c.params as Map<string, Float32Array>).clear()
        }
        for (const [n, t] of r.tensors) all.set(n, t)
      }
      return all
    }
    const shapeBatches = new Map<string, ModelBatch>()
    const dimsBatch = (rows: number, length: number) => {
      const key = `${rows}x${length}`
      let b = shapeBatches.get(key)
      if (!b) {
        if (shapeBatches.size > 8) shapeBatches.clear()
        shapeBatches.set(key, (b = shapeBatch(model, rows, length)))
      }
      return b
    }
    const bundleOf = (kind: string, op: { version: number; stepId: string; attempt: number; micros: number }, tensors: TensorBundle["tensors"], extra: Record<string, string | number>): TensorBundle => ({
      tensors, meta: { kind, job: job.job, version: op.version, step: op.version, sender: id, batchId: op.stepId, codec: "f32", extra: { attempt: op.attempt, micros: op.micros, ...extra } }
    })
    const send = (subject: string, b: TensorBundle) =>
      sendBundle(bus, subject, b).pipe(
        Effect.tap((sent) => Effect.sync(() => metrics.addBytes("sent", sent.bytes, "activations"))),
        Effect.catch((err) => Effect.logWarning(`stage ${id}: send on ${subject} failed (${err.message}); the step is retried`))
      )

    /** A failed op drops the step (stage 0 hands its batches back); a wasm abort ends the process: it cannot compute any more. */
    const opFailed = (op: { key: string; micro: number }, failure: unknown) => {
      const abort = explainWasmAbort(failure)
      if (abort !== undefined) return Effect.logError(`stage ${id}: ${abort}`).pipe(Effect.andThen(Effect.sync(() => process.exit(70))))
      return handle({ _tag: "OpFailed", key: op.key, micro: op.micro, reason: String(failure) })
    }
    const forward = (e: Extract<StageEffect, { _tag: "Forward" }>) =>
      Effect.gen(function* () {
        const t0 = performance.now()
        const op = e.op
        const r = Result.try(() =>
          k === 0 ? stageForward(st, paramsNow(), undefined, e.input as ModelBatch) : stageForward(st, paramsNow(), e.input as Activation, dimsBatch(op.meta.rows, op.meta.length))
        )
        const ms = performance.now() - t0
        if (Result.isFailure(r)) return yield* opFailed(op, r.failure)
        const m = op.meta
        yield* send(s.pipeFwd(replica, k + 1), bundleOf("activation", op, [{ name: "x", dtype: "float32", shape: r.success.shape, data: r.success.data }], {
          micro: op.micro, microBatch: m.batchId, rows: m.rows, length: m.length, units: m.units, gen: m.gen, epochBatches: m.epochBatches
        }))
        yield* handle({ _tag: "ForwardDone", key: op.key, micro: op.micro, ms })
      })

    const backward = (e: Extract<StageEffect, { _tag: "Backward" }>) =>
      Effect.gen(function* () {
        const t0 = performance.now()
        const op = e.op
        const r = Result.try(() =>
          k === 0
            ? stageBackward(model, st, paramsNow(), undefined, e.input as ModelBatch, e.dy, trainable)
            : stageBackward(model, st, paramsNow(), e.input as Activation, k === S - 1 ? e.batch! : dimsBatch(op.meta.rows, op.meta.length), e.dy, trainable)
        )
        const ms = performance.now() - t0
        if (Result.isFailure(r)) return yield* opFailed(op, r.failure)
        const g = r.success
        const loss = k === S - 1 ? g.loss! : e.loss!
        if (!Number.isFinite(loss)) return yield* handle({ _tag: "OpFailed", key: op.key, micro: op.micro, reason: `the loss of ${op.meta.batchId} is ${loss}` })
        if (g.dx) yield* send(s.pipeBwd(replica, k - 1), bundleOf("activation-grad", op, [{ name: "dx", dtype: "float32", shape: g.dx.shape, data: g.dx.data }], { micro: op.micro, loss }))
        // drills: die mid-step, after this stage sent the first micro-batch's gradient on
        if (op.micro === 0 && isArmed("stage.mid-step")) yield* bus.flush().pipe(Effect.ignore, Effect.andThen(Effect.sync(() => failpoint("stage.mid-step"))))
        yield* handle({ _tag: "BackwardDone", key: op.key, micro: op.micro, ms, grads: g.grads, loss: k === S - 1 ? loss : undefined })
      })

    /** gradient bytes pushed since the last StageStep (its pushes and any resends). */
    let gradBytes = 0
    const perform = (e: StageEffect): Effect.Effect<void> => {
      switch (e._tag) {
        case "Lease":
          return Effect.asVoid(Effect.forkIn(
            LoaderClient.leaseChecked(bus, s, replica, (b) => batchProblem(model, b)).pipe(
              Effect.flatMap((r) => {
                if (r._tag !== "Batch") return offer(r._tag === "NoBatch" ? { _tag: "LeaseReplied", noBatch: { retryAfterMs: r.retryAfterMs } } : { _tag: "LeaseReplied", failed: r.reason })
                const b: LeasedBatch = {
                  meta: r.meta, data: r.batch,
                  micro: { batchId: r.meta.batchId, rows: r.batch.size, length: freeLength(model, r.batch), units: model.units(r.batch).n, gen: r.meta.gen, epochBatches: r.meta.epochBatches }
                }
                return offer({ _tag: "LeaseReplied", batch: b })
              })
            ),
            scope, { startImmediately: true }
          ))
        case "Release":
          return LoaderClient.fail(bus, s, replica, e.batch.meta.batchId, e.batch.meta.gen, e.reason)
        case "Fetch":
          return Effect.asVoid(Effect.forkIn(
            LoaderClient.fetch(bus, s, id, e.batchId).pipe(
              Effect.flatMap((r) => {
                if (r._tag !== "Batch") return offer({ _tag: "LabelsReplied", key: e.key, micro: e.micro, failed: r.reason })
                const problem = batchProblem(model, r.batch)
                return offer(problem === undefined ? { _tag: "LabelsReplied", key: e.key, micro: e.micro, batch: r.batch } : { _tag: "LabelsReplied", key: e.key, micro: e.micro, failed: `bad batch: ${problem}` })
              })
            ),
            scope, { startImmediately: true }
          ))
        case "Pull":
          return Effect.asVoid(Effect.forkIn(pull(e.shard, e.minVersion), scope))
        case "Forward":
          return Effect.sleep(0).pipe(Effect.andThen(forward(e)), Effect.orDie)
        case "Backward":
          return Effect.sleep(0).pipe(Effect.andThen(backward(e)), Effect.orDie)
        case "SendTied":
          return send(s.pipeBwd(replica, 0), bundleOf("tied-grad", e.op, [...e.grads].map(([name, data]) => ({ name, dtype: "float32" as const, shape: cfg.tied.find((t) => t.name === name)!.shape, data })), {}))
        case "Push": {
          const { bundle, restored } = encodePush(e.shard, e.bundle)
          const v = e.bundle.meta.version
          const save = senderState.due(v) ? saveResiduals(v) : Effect.void
          return (restored !== undefined ? Effect.logInfo(`stage ${id}: ${restored}`) : Effect.void).pipe(
            Effect.andThen(sendBundle(bus, s.psPush(e.shard, replica), bundle)),
            Effect.tap((sent) => Effect.sync(() => {
              metrics.addBytes("sent", sent.bytes, "grads")
              gradBytes += sent.bytes
            })),
            Effect.catch((err) => Effect.logWarning(`stage ${id}: push to shard ${e.shard} failed (${err.message}); it is resent`)),
            Effect.andThen(save)
          )
        }
        case "Flushed": {
          const r = e.run
          hb.setInfo({ replica, stage: k, version: r.version, steps: state.stats.steps, retries: state.stats.retries })
          metrics.recordLoss("train", e.loss)
          const msg: StageStep = {
            _tag: "StageStep", v: PROTOCOL_VERSION, worker: id, replica, stage: k, version: r.version, attempt: r.attempt, micros: r.micros.length,
            spanMs: Math.max(0, state.now - r.startedAt), forwardMs: r.forwardMs, backwardMs: r.backwardMs, stashPeak: r.stashPeak, stashPeakBytes: r.stashPeakBytes,
            loss: e.loss, bytesSent: gradBytes
          }
          gradBytes = 0
          return bus.publish(s.metrics("stage"), encodeMessage(msg)).pipe(Effect.ignore)
        }
        case "Finish":
          return Deferred.succeed(finished, undefined).pipe(Effect.asVoid)
        case "RefuseParams":
          return refuseParams({ reason: e.reason, subject: s.psVersion(e.shard), sender: e.sender, version: e.version, messageId: e.messageId })
        case "Log":
          if (e.message.startsWith("state:")) return Effect.logInfo(`stage ${id}: ${e.message}; memory ${memoryLine()}`)
          return e.level === "warn" ? Effect.logWarning(`stage ${id}: ${e.message}`) : e.level === "info" ? Effect.logInfo(`stage ${id}: ${e.message}`) : Effect.logDebug(`stage ${id}: ${e.message}`)
      }
    }

    const handle = (e: StageEvent): Effect.Effect<void> =>
      Effect.suspend(() => {
        state.now = e._tag === "Tick" ? e.now : Date.now()
        return Effect.forEach(step(state, e), perform, { discard: true })
      })

    yield* Effect.forkScoped(
      Effect.gen(function* () {
        while (!state.finished) yield* handle(yield* Queue.take(queue))
      }).pipe(
        Effect.catchCause((c) => Effect.logError(`stage ${id} mailbox ended`, c)),
        Effect.ensuring(Deferred.succeed(finished, undefined))
      )
    )
    yield* Effect.forkScoped(Effect.forever(Effect.sleep(TICK_MS).pipe(Effect.andThen(Effect.suspend(() => offer({ _tag: "Tick", now: Date.now() }))))))
    const joinPull = (sh: number) =>
      ParamServerClient.pull(bus, s, sh, id, 0, 60_000, limits).pipe(
        Effect.flatMap((r) => pulled(sh, r.bundle)),
        Effect.retry({ times: 30, schedule: Schedule.spaced(300) }),
        Effect.catch((e) => Effect.logWarning(`stage ${id}: pull of shard ${sh} failed: ${e.message} (heartbeats will retry)`))
      )
    yield* Effect.forEach(cfg.reads, joinPull, { discard: true, concurrency: "unbounded" })
    return { finished, state } satisfies StageHandle
  })
