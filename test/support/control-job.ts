// Implements: a tiny GPT job run in the test process over a real NATS server — loader,
// scheduler, controller, parameter server, worker (and optionally an evaluator), each the
// real actor on a NatsBus — plus the observers control tests need: every StepApplied,
// every ControlApplied, every Rejected, and polling helpers.
// Used by test/control.test.ts and test/control.bad-messages.test.ts.
// Does not own: the actors, the NATS server (test/support/nats.ts), process-level
// clusters (test/support/cluster.ts).
import { mkdtempSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Layer, References, Result, Scope } from "effect"
import type { LogLevel } from "effect/LogLevel"
import { runController, type ControllerHandle } from "../../actors/controller/controller.ts"
import { runLoader, type LoaderHandle } from "../../actors/loader/loader.ts"
import { runParamServer, type ParamServerHandle } from "../../actors/param-server/server.ts"
import { runScheduler, type SchedulerHandle } from "../../actors/scheduler/scheduler.ts"
import { runWorker, type WorkerHandle } from "../../actors/worker/worker.ts"
import { Bus } from "../../shared/bus/Bus.ts"
import { NatsBus } from "../../shared/bus/nats.ts"
import { Compute } from "../../shared/compute/backend.ts"
import { resolveJob, type JobConfig } from "../../shared/config/job.ts"
import { ControlApplied } from "../../shared/protocol/control.ts"
import { decodeBytes } from "../../shared/protocol/decode.ts"
import { Rejected, StepApplied } from "../../shared/protocol/messages.ts"
import { subjects } from "../../shared/protocol/subjects.ts"

let counter = 0
/** A job name no other test (or earlier run against the same server) uses. */
export const uniqueJob = (prefix: string) => `${prefix}-${process.pid}-${Date.now().toString(36)}-${counter++}`

/** A 1-layer, width-16 GPT on Moby Dick: ~40 ms a step on 2 cores. */
export const tinyJob = (name: string, patch: { train?: Record<string, unknown>; schedule?: Record<string, unknown>; optimizer?: Record<string, unknown>; topology?: Record<string, unknown> } = {}): JobConfig =>
  resolveJob(
    {
      job: name,
      model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 },
      data: { batchSize: 4, valBatches: 1 },
      train: {
        steps: 100_000,
        evalEvery: 0,
        checkpointEvery: 0,
        checkpointDir: mkdtempSync(join(tmpdir(), "flotilla-control-")),
        heartbeatMs: 200,
        livenessMs: 2_000,
        ...patch.train
      },
      schedule: patch.schedule ?? { kind: "constant", lr: 1e-3 },
      ...(patch.optimizer ? { optimizer: patch.optimizer } : {}),
      ...(patch.topology ? { topology: patch.topology } : {})
    },
    `test job ${name}`
  )

export interface RunningJob {
  readonly job: JobConfig
  readonly loader: LoaderHandle
  readonly scheduler: SchedulerHandle
  readonly controller: ControllerHandle
  readonly ps: ParamServerHandle
  readonly workers: WorkerHandle[]
  /** every StepApplied of shard 0, in arrival order. */
  readonly applied: StepApplied[]
  /** every ControlApplied broadcast. */
  readonly events: ControlApplied[]
  /** every Rejected on the job's errors subject. */
  readonly errors: Rejected[]
  /** newest version applied by shard 0 (0 before the first). */
  readonly version: () => number
}

/** Start every actor of `job` in this scope (on the Bus provided); the controller keeps its history in JetStream at `nats`. */
export const startJob = (job: JobConfig, o: { nats?: readonly string[]; evaluator?: boolean } = {}): Effect.Effect<RunningJob, Error, Bus | Compute | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const s = subjects(job.job)
    const applied: StepApplied[] = []
    const events: ControlApplied[] = []
    const errors: Rejected[] = []
    yield* bus.subscribe(s.psApplied(0), (m) => Effect.sync(() => {
      const r = decodeBytes(StepApplied, m.subject, m.data)
      if (Result.isSuccess(r)) applied.push(r.success)
    }))
    yield* bus.subscribe(s.controlApplied, (m) => Effect.sync(() => {
      const r = decodeBytes(ControlApplied, m.subject, m.data)
      if (Result.isSuccess(r)) events.push(r.success)
    }))
    yield* bus.subscribe(s.errors, (m) => Effect.sync(() => {
      const r = decodeBytes(Rejected, m.subject, m.data)
      if (Result.isSuccess(r)) errors.push(r.success)
    }))
    yield* bus.flush()
    const loader = yield* runLoader({ job, id: "loader-0" })
    const scheduler = yield* runScheduler({ job, id: "scheduler-0" })
    const controller = yield* runController({ job, id: "scheduler-0-controller", nats: o.nats })
    const ps = yield* runParamServer({ job, shard: 0, id: "ps-0", resume: false })
    if (o.evaluator) yield* runWorker({ job, id: "evaluator-0", mode: "eval" })
    const workers: WorkerHandle[] = []
    for (let w = 0; w < job.topology.workers; w++) workers.push(yield* runWorker({ job, id: `worker-${w}` }))
    return { job, loader, scheduler, controller, ps, workers, applied, events, errors, version: () => applied.at(-1)?.version ?? 0 }
  })

/** Poll `pred` every 25 ms until it holds; fail with `what` after `timeoutMs`. */
export const waitUntil = (what: string, pred: () => boolean, timeoutMs = 30_000): Effect.Effect<void, Error> =>
  Effect.gen(function* () {
    const deadline = Date.now() + timeoutMs
    while (!pred()) {
      if (Date.now() > deadline) return yield* Effect.fail(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`))
      yield* Effect.sleep(25)
    }
  })

/** The layers a control test runs in: one NATS connection for every actor, and a compute backend. */
export const jobLayers = (url: string, logLevel: LogLevel = "Warn") =>
  Layer.mergeAll(NatsBus.layer({ servers: url, name: "control-test" }), Compute.layer(), Layer.succeed(References.MinimumLogLevel, logLevel))
