// Checks: bounded and async modes learn as well as sync at equal applied gradients (issue 8,
// deliverable 12). Every actor of a tiny job runs in this process on the in-process bus
// (loader, scheduler, one parameter server, an evaluator, workers), three times: sync with 1
// worker, async with 2, bounded:2 with 2. In each, a version applies ONE worker gradient of
// `batchSize` sequences, so after STEPS versions the three have applied the same number of
// gradients and samples, with the same LR schedule; the final validation loss of async and
// bounded must be within 3% of sync's. Also: no version is applied on a gradient staler than
// the number of workers (a worker holds at most one unapplied gradient at the servers).
// Caught: workers recomputing as soon as their push was held (not applied), so every new
// version started a gradient on every worker while a version consumed one: the held queue
// grew to its budget (64) and gradients were applied 64 versions stale; the loss diverged.
// Run: npx vitest run test/async.learning.test.ts   (~20-40 s on 2 cores)
import { mkdtempSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { describe, expect, it } from "@effect/vitest"
import { Deferred, Effect, Layer, References } from "effect"
import { runLoader } from "../actors/loader/loader.ts"
import { runParamServer } from "../actors/param-server/server.ts"
import { runScheduler } from "../actors/scheduler/scheduler.ts"
import { runWorker } from "../actors/worker/worker.ts"
import { Bus } from "../shared/bus/Bus.ts"
import { InProcessBus } from "../shared/bus/inprocess.ts"
import { Compute } from "../shared/compute/backend.ts"
import { resolveJob, type Consistency } from "../shared/config/job.ts"
import { decodeBytes } from "../shared/protocol/decode.ts"
import { StepApplied, ValidationLoss } from "../shared/protocol/messages.ts"
import { subjects } from "../shared/protocol/subjects.ts"

const STEPS = 150

interface Run {
  readonly valLoss: number
  readonly maxStaleness: number
  readonly samples: number
}

const train = (name: string, consistency: Consistency, workers: number): Effect.Effect<Run, Error> =>
  Effect.gen(function* () {
    const job = resolveJob({
      job: `async-learn-${name}-${process.pid}`,
      model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 },
      data: { batchSize: 8, valBatches: 4 },
      train: {
        steps: STEPS, consistency, evalEvery: STEPS, checkpointEvery: 0, seed: 7,
        checkpointDir: mkdtempSync(join(tmpdir(), "flotilla-async-")), heartbeatMs: 200, livenessMs: 15_000
      },
      topology: { workers, psShards: 1 }
    })
    const bus = yield* Bus
    const s = subjects(job.job)
    const applied: StepApplied[] = []
    const final = yield* Deferred.make<number>()
    yield* bus.subscribe(s.psApplied(0), (m) => Effect.sync(() => {
      const r = decodeBytes(StepApplied, m.subject, m.data)
      if (r._tag === "Success") applied.push(r.success)
    }))
    yield* bus.subscribe(s.metrics("evaluator"), (m) => {
      const r = decodeBytes(ValidationLoss, m.subject, m.data)
      return r._tag === "Success" && r.success.version >= STEPS ? Deferred.succeed(final, r.success.loss) : Effect.void
    })
    yield* runLoader({ job, id: "loader-0" })
    yield* runScheduler({ job, id: "scheduler-0" })
    yield* runParamServer({ job, shard: 0, id: "ps-0", resume: false })
    yield* runWorker({ job, id: "evaluator-0", mode: "eval" })
    for (let w = 0; w < workers; w++) yield* runWorker({ job, id: `worker-${w}` })
    const valLoss = yield* Deferred.await(final).pipe(
      Effect.timeoutOrElse({ duration: 60_000, orElse: () => Effect.fail(new Error(`${name}: no validation loss at version ${STEPS} (at ${applied.length})`)) })
    )
    return {
      valLoss,
      maxStaleness: applied.reduce((m, a) => Math.max(m, a.maxStaleness), 0),
      samples: applied.filter((a) => a.version <= STEPS).reduce((n, a) => n + a.samples, 0)
    }
  }).pipe(
    Effect.scoped,
    Effect.provide(Layer.mergeAll(InProcessBus.layer(), Compute.layer("wasm"), Layer.succeed(References.MinimumLogLevel, "Error")))
  )

describe("async and bounded consistency learn", () => {
  it.live("reach sync's validation loss (within 3%) at equal applied gradients", () =>
    Effect.gen(function* () {
      const sync = yield* train("sync", { mode: "sync" }, 1)
      const async = yield* train("async", { mode: "async" }, 2)
      const bounded = yield* train("bounded", { mode: "bounded", staleness: 2 }, 2)
      const line = (n: string, r: Run) => `${n}: val ${r.valLoss.toFixed(4)}, ${r.samples} samples, max staleness ${r.maxStaleness}`
      const report = [line("sync 1w", sync), line("async 2w", async), line("bounded:2 2w", bounded)].join("; ")
      console.info(`[async.learning] ${report}`)
      // equal applied gradients: one gradient of batchSize per version in all three
      expect(async.samples, report).toBe(sync.samples)
      expect(bounded.samples, report).toBe(sync.samples)
      expect(async.maxStaleness, report).toBeLessThanOrEqual(2)
      expect(bounded.maxStaleness, report).toBeLessThanOrEqual(2)
      expect(async.valLoss / sync.valLoss, report).toBeLessThan(1.03)
      expect(bounded.valLoss / sync.valLoss, report).toBeLessThan(1.03)
    }), 120_000)
})
