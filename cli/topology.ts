/**
 * Implements: a job's topology, in one place — which actors a job runs, with their ids
 * and roles (`jobActors`), and how to run ONE of them in this process given its role
 * (`runActor`). `flotilla start` runs every actor of `jobActors` in one process,
 * `flotilla up` spawns one `flotilla launch` process per actor (and supervises them),
 * `flotilla launch` runs one.
 *
 *   loader-0                       the data loader
 *   scheduler-0                    the LR scheduler, with the job's controller in the same process
 *   ps-0 … ps-<K-1>                parameter-server shards
 *   evaluator-0                    when evalEvery is not 0, valBatches > 0 and valFraction > 0
 *   worker-0 … worker-<N-1>        data-parallel workers; with topology.stages S > 1 each is a
 *                                  replica of S stage workers: worker-r (stage 0), worker-r-s1 …
 *
 * Does not own: the actors (actors/*), the bus layer (each command picks its own),
 * processes and restarts (cli/up.ts, cli/supervisor.ts).
 */
import { Deferred, Effect, Layer, type Scope } from "effect"
import { runController } from "../actors/controller/controller.ts"
import { runLoader } from "../actors/loader/loader.ts"
import { runParamServer } from "../actors/param-server/server.ts"
import { runScheduler } from "../actors/scheduler/scheduler.ts"
import { runWorker } from "../actors/worker/worker.ts"
import { runStageWorker, stageId } from "../actors/worker/stage.ts"
import type { Bus } from "../shared/bus/Bus.ts"
import type { NatsAuth } from "../shared/bus/nats.ts"
import type { BackendUnavailableError, Compute } from "../shared/compute/backend.ts"
import type { JobConfig } from "../shared/config/job.ts"
import type { Role } from "../shared/protocol/subjects.ts"
import { runRelay } from "../actors/quantizer/relay.ts"
import { serveQuantize } from "../actors/quantizer/service.ts"
import { makeFileStore, makeJetStreamStore, type CheckpointStoreShape } from "../shared/checkpoint/store.ts"

/**
 * The checkpoint store a job's parameter servers use (train.checkpointStore): files under
 * checkpointDir, or the JetStream object store on the job's NATS servers (its connection
 * lives as long as the scope).
 */
export const checkpointStoreFor = (job: JobConfig, nats: readonly string[] | undefined, auth?: NatsAuth): Effect.Effect<CheckpointStoreShape, Error, Scope.Scope> =>
  job.train.checkpointStore === "file"
    ? Effect.succeed(makeFileStore(job.train.checkpointDir))
    : nats === undefined || nats.length === 0
      ? Effect.fail(new Error("train.checkpointStore is jetstream, which needs NATS: use `flotilla up` or `flotilla launch --nats URL` (the embedded `flotilla start` has no NATS server)"))
      : makeJetStreamStore({ servers: nats, name: `flotilla-${job.job}-checkpoints`, auth }).pipe(Effect.mapError((e) => new Error(e.message)))

/** The roles `flotilla launch` runs (the parameter server's wire role is `ps`). */
export const ACTOR_ROLES = ["loader", "worker", "evaluator", "param-server", "scheduler", "quantizer"] as const
export type ActorRole = (typeof ACTOR_ROLES)[number]
export const isActorRole = (r: string): r is ActorRole => (ACTOR_ROLES as readonly string[]).includes(r)

/** The role an actor has on the wire (heartbeats, telemetry). */
export const wireRole = (r: ActorRole): Role => (r === "param-server" ? "ps" : r)

export interface ActorSpec {
  readonly role: ActorRole
  readonly id: string
  /** param-server: which shard (0 for the other roles). */
  readonly shard: number
  /** worker of a pipeline job: its stage and replica (the replica is stage 0's id). */
  readonly stage?: number
  readonly replica?: string
}

/** Workers and evaluators are done at the job's final version; the other roles run until stopped. */
export const finishesOnItsOwn = (role: ActorRole): boolean => role === "worker" || role === "evaluator"

/** Whether the job runs an evaluator: it needs a validation split and an interval. */
export const hasEvaluator = (job: JobConfig): boolean => job.train.evalEvery !== 0 && job.data.valBatches > 0 && job.data.valFraction > 0

/** Every actor of a job, in start order (services first, so workers find them up). */
export const jobActors = (job: JobConfig): ActorSpec[] => [
  { role: "loader", id: "loader-0", shard: 0 },
  { role: "scheduler", id: "scheduler-0", shard: 0 },
  ...Array.from({ length: job.topology.psShards }, (_, k): ActorSpec => ({ role: "param-server", id: `ps-${k}`, shard: k })),
  ...(hasEvaluator(job) ? [{ role: "evaluator", id: "evaluator-0", shard: 0 } satisfies ActorSpec] : []),
  ...Array.from({ length: job.topology.workers }, (_, w): ActorSpec[] =>
    job.topology.stages === 1
      ? [{ role: "worker", id: `worker-${w}`, shard: 0 }]
      : Array.from({ length: job.topology.stages }, (_, k): ActorSpec => ({ role: "worker", id: stageId(`worker-${w}`, k), shard: 0, stage: k, replica: `worker-${w}` }))
  ).flat()
]

/** The controller that runs beside scheduler `id`. */
export const controllerIdOf = (schedulerId: string): string => `${schedulerId}-controller`

export interface RunActorOptions {
  readonly job: JobConfig
  /** where workers and evaluators compute: `start` shares its one backend, `launch` builds one. */
  readonly compute: Layer.Layer<Compute, BackendUnavailableError>
  /** param-server: resume from the newest checkpoint (default true). */
  readonly resume?: boolean
  /** param-server: the first step waits for this many live workers (default topology.workers). */
  readonly minWorkers?: number
  /** worker: push through the quantizer relay of this name; quantizer: relay under this name. */
  readonly relay?: string
  /** scheduler: NATS servers, to keep the control history in JetStream (memory when absent); param-server: for a jetstream checkpoint store. */
  readonly nats?: readonly string[]
  /** the credentials of those own connections (the history's, the checkpoint store's): this actor's. */
  readonly natsAuth?: NatsAuth
}

export interface RunningActor {
  readonly spec: ActorSpec
  /**
   * Completes when the actor's part of the job is done: a worker or evaluator at the
   * final version (or told to stop), a parameter server when its last step is applied
   * and checkpointed. Never, for the loader and the scheduler.
   */
  readonly finished: Effect.Effect<void>
  /** One line for the log once it is done. */
  readonly describe: () => string
}

/** Run one actor in the current scope (its subscriptions and fibers live as long as the scope). */
export const runActor = (
  spec: ActorSpec,
  o: RunActorOptions
): Effect.Effect<RunningActor, Error | BackendUnavailableError, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const { job } = o
    const { id } = spec
    switch (spec.role) {
      case "loader": {
        yield* runLoader({ job, id })
        return { spec, finished: Effect.never, describe: () => `${id}: stopped` }
      }
      case "scheduler": {
        yield* runScheduler({ job, id })
        yield* runController({ job, id: controllerIdOf(id), nats: o.nats, natsAuth: o.natsAuth })
        return { spec, finished: Effect.never, describe: () => `${id}: stopped` }
      }
      case "quantizer": {
        // post-training quantization on request, and (--relay NAME) a relay for a slow link
        yield* serveQuantize(job.job).pipe(Effect.provide(o.compute))
        const relay = o.relay ? yield* runRelay({ job, name: o.relay }) : undefined
        return {
          spec, finished: Effect.never,
          describe: () => `${id}: stopped${relay ? ` (relay ${o.relay}: ${relay.state.stats.combined} combinations of ${relay.state.stats.parts} gradients)` : ""}`
        }
      }
      case "param-server": {
        const store = yield* checkpointStoreFor(job, o.nats, o.natsAuth)
        const h = yield* runParamServer({ job, shard: spec.shard, id, resume: o.resume ?? true, minWorkers: o.minWorkers, store })
        return { spec, finished: Deferred.await(h.finished), describe: () => `${id}: shard ${spec.shard} at version ${h.state.version}` }
      }
      case "worker":
      case "evaluator": {
        if (spec.role === "worker" && job.topology.stages > 1) {
          if (spec.stage === undefined) return yield* Effect.fail(new Error(`job ${job.job} is a pipeline of ${job.topology.stages} stages: a worker needs its stage (flotilla launch worker --stage K [--replica R])`))
          const h = yield* runStageWorker({ job, replica: spec.replica ?? "worker-0", stage: spec.stage, id }).pipe(Effect.provide(o.compute))
          const st = h.state.stats
          return { spec, finished: Deferred.await(h.finished), describe: () => `${id}: stage ${spec.stage} done (${st.steps} steps, ${st.retries} retried, ${st.dropped} dropped)` }
        }
        const h = yield* runWorker({ job, id, mode: spec.role === "evaluator" ? "eval" : "train", relay: o.relay }).pipe(Effect.provide(o.compute))
        const st = h.stats
        return {
          spec,
          finished: Deferred.await(h.finished),
          describe: () => `${id}: done (${st.steps} steps, ${st.stale} stale, ${st.bytesSent} bytes sent)`
        }
      }
    }
  })
