/**
 * Implements: watching a running job from outside — the progress bar, the curves, and
 * the end-of-run summary. Used by `flotilla start` (in-process bus) and `flotilla up`
 * (NATS); it is a plain subscriber, so it never slows the job down.
 *
 * Listens to `ps.0.applied` (train loss, tokens, LR per version), `metrics.evaluator`
 * (validation loss) and `metrics.worker` (bytes on the wire), until shard 0 reports the
 * final version and the evaluator has reported on it.
 */
import { Deferred, Effect, Result, Scope } from "effect"
import { Bus } from "../shared/bus/Bus.ts"
import type { JobConfig } from "../shared/config/job.ts"
import { decodeBytes } from "../shared/protocol/decode.ts"
import { StageStep, StepApplied, ValidationLoss, WorkerStep } from "../shared/protocol/messages.ts"
import { subjects } from "../shared/protocol/subjects.ts"
import { makeProgress } from "../shared/ui/progress.ts"

export interface RunSummary {
  readonly job: string
  readonly steps: number
  readonly firstTrainLoss: number
  readonly finalTrainLoss: number
  readonly firstValLoss: number | null
  readonly finalValLoss: number | null
  /** the final validation accuracy (classifiers), else null. */
  readonly valAccuracy: number | null
  /** every metric of the final evaluation (loss, perplexity; or loss, accuracy, precision, recall, f1). */
  readonly valMetrics: Readonly<Record<string, number>> | null
  /** complete epochs at the end (a job bounded by epochs). */
  readonly epochs: number
  readonly tokensPerSec: number
  readonly tokens: number
  readonly seconds: number
  readonly bytesOnWire: number
  readonly curves: {
    readonly train: Array<[number, number]>
    readonly val: Array<[number, number]>
    readonly lr: Array<[number, number]>
    /** validation accuracy per evaluation (classifiers; empty otherwise). */
    readonly valAccuracy: Array<[number, number]>
  }
}

export interface Observer {
  /** completes with the summary once the final version and its validation loss are in. */
  readonly done: Deferred.Deferred<RunSummary>
  readonly summary: () => RunSummary
}

export const observeJob = (
  job: JobConfig,
  opts: { progress?: boolean; expectValidation?: boolean } = {}
): Effect.Effect<Observer, never, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const s = subjects(job.job)
    const epochsCap = job.train.epochs
    const progress = opts.progress === false ? undefined : makeProgress({ total: job.train.steps, label: job.job })
    const unit = job.model.kind === "gpt" ? "tok" : "samples"
    const valAcc: Array<[number, number]> = []
    let valMetrics: Record<string, number> | null = null
    let epochsDone = 0
    let batchesSeen = 0
    const train: Array<[number, number]> = []
    const val: Array<[number, number]> = []
    const lr: Array<[number, number]> = []
    let tokens = 0
    let bytes = 0
    let t0: number | undefined
    let tLast = 0
    let finalVersion: number | undefined
    const done = yield* Deferred.make<RunSummary>()
    const expectVal = (opts.expectValidation ?? true) && job.train.evalEvery !== 0 && job.data.valBatches > 0 && job.data.valFraction > 0

    const summary = (): RunSummary => {
      const secs = t0 === undefined ? 0 : (tLast - t0) / 1000
      return {
        job: job.job,
        steps: train.length > 0 ? train[train.length - 1][0] : 0,
        firstTrainLoss: train[0]?.[1] ?? Number.NaN,
        finalTrainLoss: train[train.length - 1]?.[1] ?? Number.NaN,
        firstValLoss: val[0]?.[1] ?? null,
        finalValLoss: val[val.length - 1]?.[1] ?? null,
        valAccuracy: valAcc[valAcc.length - 1]?.[1] ?? null,
        valMetrics,
        epochs: epochsDone,
        tokensPerSec: secs > 0 ? tokens / secs : 0,
        tokens,
        seconds: secs,
        bytesOnWire: bytes,
        curves: { train, val, lr, valAccuracy: valAcc }
      }
    }
    const maybeDone = Effect.suspend(() => {
      if (finalVersion === undefined) return Effect.void
      if (expectVal && !val.some(([v]) => v >= finalVersion!)) return Effect.void
      progress?.done()
      return Deferred.succeed(done, summary()).pipe(Effect.asVoid)
    })

    yield* bus.subscribe(s.psApplied(0), (m) =>
      Effect.gen(function* () {
        const r = decodeBytes(StepApplied, m.subject, m.data)
        if (Result.isFailure(r)) return
        const a = r.success
        const now = Date.now()
        // the first update's time includes start-up (compile, first pull): start the clock there
        if (t0 === undefined) t0 = now
        else tokens += a.tokens
        tLast = now
        // a server that restarted (or rolled back) recomputes the versions after its
        // checkpoint: the curve keeps the surviving history
        while (train.length > 0 && train[train.length - 1][0] >= a.version) train.pop()
        while (lr.length > 0 && lr[lr.length - 1][0] >= a.version - 1) lr.pop()
        train.push([a.version, a.loss])
        lr.push([a.version - 1, a.lr])
        const secs = (tLast - t0) / 1000
        epochsDone = a.epochsDone ?? epochsDone
        batchesSeen += a.batchIds.reduce((n, id) => n + id.split("+").length, 0)
        // a job bounded by epochs: its total is epochs × batches per epoch / batches per version
        const perVersion = batchesSeen / Math.max(1, train.length)
        const estimate = epochsCap > 0 && a.epochBatches ? Math.ceil((epochsCap * a.epochBatches) / perVersion) : undefined
        progress?.update({
          step: a.version, loss: a.loss, valLoss: val[val.length - 1]?.[1], valAccuracy: valAcc[valAcc.length - 1]?.[1],
          tokensPerSec: secs > 0 ? tokens / secs : 0, lr: a.lr, unit,
          total: estimate === undefined ? undefined : Math.min(job.train.steps, Math.max(estimate, a.version)),
          epoch: epochsCap > 0 ? { done: epochsDone, of: epochsCap } : undefined
        })
        if (a.final) finalVersion = a.version
        yield* maybeDone
      })
    )
    yield* bus.subscribe(s.metrics("evaluator"), (m) =>
      Effect.gen(function* () {
        const r = decodeBytes(ValidationLoss, m.subject, m.data)
        if (Result.isFailure(r)) return
        while (val.length > 0 && val[val.length - 1][0] >= r.success.version) val.pop()
        val.push([r.success.version, r.success.loss])
        const acc = r.success.metrics?.["accuracy"]
        if (acc !== undefined) {
          while (valAcc.length > 0 && valAcc[valAcc.length - 1][0] >= r.success.version) valAcc.pop()
          valAcc.push([r.success.version, acc])
        }
        valMetrics = r.success.metrics ?? { loss: r.success.loss }
        yield* maybeDone
      })
    )
    yield* bus.subscribe(s.metrics("worker"), (m) => {
      const r = decodeBytes(WorkerStep, m.subject, m.data)
      if (Result.isSuccess(r)) bytes += r.success.bytesSent
      return Effect.void
    })
    // a pipeline's stages report their pushes in StageStep
    yield* bus.subscribe(s.metrics("stage"), (m) => {
      const r = decodeBytes(StageStep, m.subject, m.data)
      if (Result.isSuccess(r)) bytes += r.success.bytesSent
      return Effect.void
    })
    return { done, summary }
  }).pipe(Effect.orDie)
