/**
 * Implements: the forward/backward worker actor (and, with `mode: "eval"`, the
 * evaluator that reports validation loss).
 *
 * Holds nothing durable: a cached copy of each shard's latest params (from the
 * `ps.*.version` broadcasts, or a `ps.<k>.pull` when it joins). Train loop: lease a batch
 * → wait for params (sync: a version newer than the one it last pushed for) → forward +
 * backward with TensorFlow.js → push each shard its gradients (shared/wire, f32 or int8
 * with error feedback) → report `WorkerStep`. A gradient that is already stale when it
 * is ready (sync: a newer version arrived meanwhile) is not pushed; the batch is handed
 * back (`BatchFailed`) so another replica computes it on fresh params.
 * Needs the Compute service (a TensorFlow.js backend). Run alone:
 * `flotilla launch worker --job FILE --nats URL`.
 */
import { Deferred, Effect, Fiber, Result, Schedule, Scope } from "effect"
import { Bus, type BusMessage } from "../../shared/bus/Bus.ts"
import { onControl } from "../../shared/actor/control-listener.ts"
import { runHeartbeat } from "../../shared/actor/membership.ts"
import type { JobConfig } from "../../shared/config/job.ts"
import { Compute } from "../../shared/compute/backend.ts"
import { evalLoss, lossAndGrads } from "../../shared/models/model.ts"
import { makeModel } from "../../shared/models/zoo.ts"
import { decodeBytes, decodeValue, encodeMessage, parseJson } from "../../shared/protocol/decode.ts"
import {
  BatchLeased,
  HEADER_BATCH,
  LeaseReply,
  Rejected,
  type ValidationLoss,
  type WorkerStep
} from "../../shared/protocol/messages.ts"
import { assignShards } from "../../shared/protocol/sharding.ts"
import { PROTOCOL_VERSION, subjects } from "../../shared/protocol/subjects.ts"
import { currentMetrics } from "../../shared/telemetry/metrics.ts"
import { toWire } from "../../shared/wire/codec.ts"
import type { Codec, TensorBundle } from "../../shared/wire/tensor.ts"
import { receiveBundles, requestBundle, sendBundle } from "../../shared/wire/transport.ts"
import { accumulateGrads } from "./accumulate.ts"

export interface WorkerOptions {
  readonly job: JobConfig
  readonly id: string
  readonly mode?: "train" | "eval"
  /** gradient codec on the wire (int8-block uses error feedback). Default f32. */
  readonly codec?: Codec
}

export interface WorkerHandle {
  /** completes when the job's final version is seen (or the worker is told to stop). */
  readonly finished: Deferred.Deferred<void>
  readonly stats: { steps: number; stale: number; tokens: number; bytesSent: number }
}

interface Batch {
  readonly meta: BatchLeased
  readonly tokens: Int32Array
}

const decodeBatch = (m: BusMessage): Result.Result<Batch, string> => {
  const h = m.headers[HEADER_BATCH]
  if (h === undefined) {
    const j = parseJson(m.data)
    if (Result.isFailure(j)) return Result.fail(j.failure)
    const r = decodeValue(LeaseReply, m.subject, j.success)
    if (Result.isFailure(r)) return Result.fail(r.failure.reason)
    return Result.fail(r.success._tag === "NoBatch" ? `no batch: ${r.success.reason}` : `rejected: ${r.success.reason}`)
  }
  const meta = parseJson(new TextEncoder().encode(h))
  if (Result.isFailure(meta)) return Result.fail(meta.failure)
  const d = decodeValue(BatchLeased, m.subject, meta.success)
  if (Result.isFailure(d)) return Result.fail(d.failure.reason)
  const need = d.success.B * (d.success.T + 1) * 4
  if (m.data.byteLength !== need) return Result.fail(`batch payload is ${m.data.byteLength} bytes, expected ${need}`)
  const tokens = new Int32Array(d.success.B * (d.success.T + 1))
  new Uint8Array(tokens.buffer).set(m.data)
  return Result.succeed({ meta: d.success, tokens })
}

export const runWorker = (o: WorkerOptions): Effect.Effect<WorkerHandle, Error, Bus | Compute | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    yield* Compute
    const { job, id } = o
    const mode = o.mode ?? "train"
    const s = subjects(job.job)
    const model = makeModel(job.model)
    const shards = job.topology.psShards
    const shardOf = assignShards(model.specs, shards)
    const codec: Codec = o.codec ?? "f32"
    const residuals = new Map<string, Float32Array>()
    const stats = { steps: 0, stale: 0, tokens: 0, bytesSent: 0 }
    const finished = yield* Deferred.make<void>()
    const metrics = yield* currentMetrics

    // ---- the params cache: newest version of each shard, and a signal on every change
    const cache = new Map<number, { version: number; params: Map<string, Float32Array> }>()
    let changed = yield* Deferred.make<void>()
    const onParams = (b: TensorBundle) =>
      Effect.gen(function* () {
        const shard = Number(b.meta.extra?.shard ?? -1)
        if (b.meta.kind !== "params" || !(shard >= 0 && shard < shards)) return
        const cur = cache.get(shard)
        if (cur && cur.version >= b.meta.version) return
        // receiveBundles owns a fresh buffer per bundle (no `borrow`), so its views are ours to keep
        cache.set(shard, { version: b.meta.version, params: new Map(b.tensors.map((t) => [t.name, t.data as Float32Array])) })
        // the final version ends training before anyone waiting for params wakes up
        if (b.meta.version >= job.train.steps && mode === "train") yield* Deferred.succeed(finished, undefined)
        const old = changed
        changed = yield* Deferred.make<void>()
        yield* Deferred.succeed(old, undefined)
      })
    yield* receiveBundles(bus, s.psVersionAll, onParams)

    /** versions of all shards when every shard is cached at the same version (else undefined). */
    const commonVersion = (): number | undefined => {
      if (cache.size < shards) return undefined
      const vs = [...cache.values()].map((c) => c.version)
      return vs.every((v) => v === vs[0]) ? vs[0] : undefined
    }
    const fullParams = () => {
      const all = new Map<string, Float32Array>()
      for (const c of cache.values()) for (const [k, v] of c.params) all.set(k, v)
      return all
    }
    const waitFor = (pred: () => boolean): Effect.Effect<boolean> =>
      Effect.gen(function* () {
        while (true) {
          if (yield* Deferred.isDone(finished)) return false
          if (pred()) return true
          yield* Deferred.await(changed).pipe(Effect.timeout(1_000), Effect.ignore)
        }
      })

    // ---- join: pull every shard once (the broadcasts keep us current afterwards)
    const pull = (k: number) =>
      requestBundle(bus, s.psPull(k), encodeMessage({ _tag: "PullParams", v: PROTOCOL_VERSION, worker: id, minVersion: 0 }), { timeoutMs: 10_000 }).pipe(
        Effect.flatMap((r) => onParams(r.bundle)),
        Effect.retry({ times: 30, schedule: Schedule.spaced(300) }),
        Effect.catch((e) => Effect.logWarning(`worker ${id}: pull of shard ${k} failed: ${e.message}`))
      )
    yield* Effect.forEach(Array.from({ length: shards }, (_, k) => k), pull, { discard: true })

    yield* bus.subscribe(s.errors, (m) => {
      const r = decodeBytes(Rejected, m.subject, m.data)
      return Result.isSuccess(r) && r.success.sender === id
        ? Effect.logWarning(`worker ${id}: ${r.success.by} rejected my message (${r.success.code}): ${r.success.reason}`)
        : Effect.void
    })

    const hb = yield* runHeartbeat(s, mode === "eval" ? "evaluator" : "worker", id, job.train.heartbeatMs)

    // stop: finish cleanly (the loop ends, `flotilla launch` exits 0); set-consistency: wait like the servers aggregate
    let consistency = job.train.consistency.mode
    yield* onControl(s, {
      stop: () => Deferred.succeed(finished, undefined),
      "set-consistency": (c) => Effect.sync(() => void (consistency = c.mode))
    })

    const lease = (split: "train" | "val", index?: number) =>
      bus.request(s.dataLease, encodeMessage({ _tag: "LeaseBatch", v: PROTOCOL_VERSION, worker: id, split, index }), { timeoutMs: 5_000 }).pipe(
        Effect.map(decodeBatch)
      )

    // ---- train loop
    const trainLoop: Effect.Effect<void, Error> = Effect.gen(function* () {
      let lastVersion = -1
      /** end of the last pushed step: tokens/s counts every step's wall time, stale ones too. */
      let lastPushAt = performance.now()
      /** leased micro-batches, until train.accumulate of them make one gradient. */
      const held: Batch[] = []
      const leaseTrain: Effect.Effect<Result.Result<Batch, string>> = lease("train").pipe(
        Effect.catch((e) => Effect.succeed(Result.fail(e.message)))
      )
      let prefetched: Fiber.Fiber<Result.Result<Batch, string>> | undefined
      /** one lease → params → forward/backward → push; one trace per step when tracing is on. */
      const iteration = Effect.gen(function* () {
        const t0 = performance.now()
        // the lease for this step was usually requested while the last one was pushing
        const leased: Result.Result<Batch, string> = prefetched ? yield* Fiber.join(prefetched) : yield* leaseTrain
        prefetched = undefined
        if (Result.isFailure(leased)) {
          if (!leased.failure.includes("paused")) yield* Effect.logDebug(`worker ${id}: ${leased.failure}`)
          yield* Effect.sleep(200)
          return "continue" as const
        }
        held.push(leased.success)
        if (held.length < job.train.accumulate) return "continue" as const
        const micro = held.splice(0)
        const t1 = performance.now()
        const sync = consistency === "sync"
        const ok = yield* waitFor(() => {
          const v = commonVersion()
          return sync ? v !== undefined && v > lastVersion : cache.size === shards
        })
        if (!ok) return "break" as const
        const t2 = performance.now()
        const versions = new Map([...cache].map(([k, c]) => [k, c.version]))
        const v = Math.min(...versions.values())
        const params = fullParams()
        // ask for the next batch before computing: the request leaves now (the short sleep
        // lets the socket write happen before TensorFlow.js holds the thread), the loader
        // answers while we compute, and the next step finds its batch waiting
        if (job.train.accumulate === 1) {
          prefetched = yield* Effect.forkChild(leaseTrain, { startImmediately: true })
          yield* Effect.sleep(1)
        }
        const { batchId, samples, loss, grads } = yield* Effect.sync(() =>
          accumulateGrads(
            micro.map((b) => ({ batchId: b.meta.batchId, samples: b.meta.B, ...lossAndGrads(model, params, { tokens: b.tokens, batchSize: b.meta.B, seqLen: b.meta.T }) }))
          )
        ).pipe(Effect.withSpan("worker.forward_backward", { attributes: { "flotilla.version": v, "flotilla.micro_batches": micro.length } }))
        const t3 = performance.now()
        if (sync && (commonVersion() ?? -1) > v) {
          stats.stale++
          for (const b of micro) {
            yield* bus.publish(s.dataAck, encodeMessage({ _tag: "BatchFailed", v: PROTOCOL_VERSION, worker: id, batchId: b.meta.batchId, reason: `stale: version ${v} was superseded while computing` }))
          }
          lastVersion = -1
          return "continue" as const
        }
        const tokens = micro.reduce((n, b) => n + b.meta.B * b.meta.T, 0)
        // Push to every shard and report the push (WorkerStep) as one step that a SIGTERM
        // cannot cut: a clean leave never leaves a gradient on some shards only, and the
        // loader, which keeps a pushed batch when its worker leaves, always hears of it.
        yield* Effect.uninterruptible(Effect.gen(function* () {
          let bytes = 0
          for (let k = 0; k < shards; k++) {
            const tensors = model.specs
              .filter((sp) => shardOf.get(sp.name) === k)
              .map((sp) => {
                let residual = residuals.get(sp.name)
                if (codec !== "f32" && !residual) residuals.set(sp.name, (residual = new Float32Array(grads.get(sp.name)!.length)))
                return toWire(sp.name, sp.shape, grads.get(sp.name)!, codec, { residual })
              })
            const sent = yield* sendBundle(bus, s.psPush(k), {
              tensors,
              meta: { kind: "grads", job: job.job, version: versions.get(k)!, step: versions.get(k)!, sender: id, batchId, codec, extra: { samples, tokens, loss } }
            }).pipe(Effect.orDie)
            bytes += sent.bytes
          }
          const t4 = performance.now()
          lastVersion = v
          stats.steps++
          stats.tokens += tokens
          stats.bytesSent += bytes
          hb.setInfo({ version: v, steps: stats.steps })
          const metric: WorkerStep = {
            _tag: "WorkerStep", v: PROTOCOL_VERSION, worker: id, version: v, batchId, loss, tokens,
            waitBatchMs: t1 - t0, waitParamsMs: t2 - t1, computeMs: t3 - t2, pushMs: t4 - t3, bytesSent: bytes
          }
          yield* bus.publish(s.metrics("worker"), encodeMessage(metric)).pipe(Effect.ignore)
          metrics.recordLoss("train", loss)
          metrics.recordStepTimes({ wait_batch: metric.waitBatchMs, wait_params: metric.waitParamsMs, compute: metric.computeMs, push: metric.pushMs, total: t4 - t0 })
          metrics.addBytes("sent", bytes, "grads")
          if (t4 > lastPushAt) metrics.recordTokensPerSec((tokens * 1000) / (t4 - lastPushAt))
          lastPushAt = t4
        }))
        return "continue" as const
      }).pipe(Effect.withSpan("worker.step", { attributes: { "flotilla.worker": id } }))
      while (!(yield* Deferred.isDone(finished))) {
        if ((yield* iteration) === "break") break
      }
    })

    // ---- eval loop: validation loss every evalEvery versions, and at the end
    const evalLoop: Effect.Effect<void, Error> = Effect.gen(function* () {
      const valBatches: Batch[] = []
      for (let i = 0; i < job.data.valBatches; i++) {
        const b = yield* lease("val", i).pipe(Effect.orDie)
        if (Result.isFailure(b)) return yield* Effect.fail(new Error(`evaluator ${id}: val batch ${i}: ${b.failure}`))
        valBatches.push(b.success)
      }
      let lastEval = -1
      const every = Math.max(1, job.train.evalEvery)
      while (true) {
        const ok = yield* waitFor(() => {
          const v = commonVersion()
          return v !== undefined && v > lastEval && (v % every === 0 || v >= job.train.steps)
        })
        if (!ok) break
        const v = commonVersion()!
        const params = fullParams()
        const losses = valBatches.map((b) => evalLoss(model, params, { tokens: b.tokens, batchSize: b.meta.B, seqLen: b.meta.T }))
        const loss = losses.reduce((a, b) => a + b, 0) / losses.length
        lastEval = v
        const msg: ValidationLoss = { _tag: "ValidationLoss", v: PROTOCOL_VERSION, evaluator: id, version: v, loss, batches: losses.length }
        yield* bus.publish(s.metrics("evaluator"), encodeMessage(msg)).pipe(Effect.ignore)
        metrics.recordLoss("val", loss)
        if (v >= job.train.steps) {
          yield* Deferred.succeed(finished, undefined)
          break
        }
      }
    })

    const loop = mode === "eval" ? evalLoop : trainLoop
    yield* loop.pipe(
      Effect.catchCause((c) => Effect.logError(`worker ${id} loop ended`, c)),
      Effect.ensuring(Deferred.succeed(finished, undefined)),
      Effect.forkScoped
    )
    return { finished, stats } satisfies WorkerHandle
  })
