/**
 * Implements: `flotilla launch <role>` — one actor as its own process, joining a job
 * over NATS. Which actor a role is, and how it runs, is cli/topology.ts (the same code
 * `flotilla start` runs in-process); only the Bus layer differs. Workers and evaluators
 * exit when the job's final version is out; the other roles run until SIGTERM/SIGINT (a
 * parameter server checkpoints on the way out). Every role exits cleanly (code 0) on
 * `flotilla ctl <job> stop`. The scheduler's process also runs the job's controller
 * (actors/controller), its history in JetStream when the server has it.
 * $FLOTILLA_RESTARTS (set by `flotilla up` when it restarts an actor) goes out in the
 * actor's heartbeats, so `flotilla ctl <job> status` shows it.
 * Credentials (cli/auth.ts: --creds, --nkey, --user/--password, --token, TLS, or their
 * NATS_* variables) go to every connection the actor opens: the bus, the control history,
 * the JetStream checkpoint store. A parameter server's id defaults to `ps-<shard>`, the id
 * its role's permissions name (shared/bus/permissions.ts).
 */
import { existsSync } from "node:fs"
import { hostname } from "node:os"
import { Deferred, Effect, Layer } from "effect"
import { stopRequested } from "../shared/actor/control-listener.ts"
import { describeAuth, NatsBus } from "../shared/bus/nats.ts"
import { authFromArgs } from "./auth.ts"
import { Compute, type BackendPreference } from "../shared/compute/backend.ts"
import { loadJobFile, resolveJob, type JobConfig } from "../shared/config/job.ts"
import { isToken, subjects } from "../shared/protocol/subjects.ts"
import { Metrics } from "../shared/telemetry/metrics.ts"
import { Telemetry } from "../shared/telemetry/otel.ts"
import { TracedBus } from "../shared/telemetry/traced-bus.ts"
import { codecFromFlag, UsageError } from "./main.ts"
import { stageId } from "../actors/worker/stage.ts"
import { ACTOR_ROLES, finishesOnItsOwn, isActorRole, runActor, wireRole } from "./topology.ts"

/** The roles `flotilla launch` takes (defined in cli/topology.ts). */
export const ROLES = ACTOR_ROLES

export const jobFromFlag = (flag: string | undefined): JobConfig => {
  if (!flag) throw new UsageError("--job is required: a job file (JSON/YAML) or a job name")
  return existsSync(flag) ? loadJobFile(flag) : resolveJob({ job: flag }, `--job ${flag}`)
}

/** The job with `--codec` over train.compression.codec (the parameter servers stamp it on every version; the senders follow). */
export const withCodec = (job: JobConfig, codec: string | undefined): JobConfig =>
  codec === undefined ? job : { ...job, train: { ...job.train, compression: { ...job.train.compression, codec } } }

export const launch = (o: { role: string; values: Record<string, unknown> }) => {
  const v = o.values
  const role = o.role
  if (!isActorRole(role)) throw new UsageError(`unknown role ${JSON.stringify(role)}: one of ${ACTOR_ROLES.join(", ")}`)
  const job = withCodec(jobFromFlag(v.job as string | undefined), codecFromFlag(v.codec))
  const relay = v.relay as string | undefined
  if (relay !== undefined && !(role === "worker" || role === "quantizer")) throw new UsageError(`--relay is for a worker (push through that relay) or a quantizer (be that relay), not a ${role}`)
  if (relay !== undefined && !isToken(relay)) throw new UsageError(`--relay must be 1-64 of [A-Za-z0-9_-], got ${JSON.stringify(relay)}`)
  const servers = String(v.nats ?? process.env.NATS_URL ?? "nats://127.0.0.1:4222").split(",")
  const auth = authFromArgs(v)
  const shard = v.shard === undefined ? 0 : Number(v.shard)
  if (!(Number.isInteger(shard) && shard >= 0 && shard < job.topology.psShards)) {
    throw new UsageError(`--shard must be in [0, ${job.topology.psShards}) for this job, got ${v.shard}`)
  }
  // a pipeline job's worker hosts one stage of one replica; stage 0's id is the replica's
  const pipeline = role === "worker" && job.topology.stages > 1
  if (!pipeline && (v.stage !== undefined || v.replica !== undefined)) throw new UsageError(`--stage and --replica are for workers of a pipeline job (topology.stages > 1); job ${job.job} has ${job.topology.stages} stage`)
  const stage = v.stage === undefined ? undefined : Number(v.stage)
  if (pipeline && !(stage !== undefined && Number.isInteger(stage) && stage >= 0 && stage < job.topology.stages)) {
    throw new UsageError(`job ${job.job} is a pipeline of ${job.topology.stages} stages: --stage must be in [0, ${job.topology.stages}), got ${v.stage ?? "none"}`)
  }
  const replicaFlag = (v.replica as string | undefined) ?? "0"
  const replica = /^\d+$/.test(replicaFlag) ? `worker-${replicaFlag}` : replicaFlag
  const id = pipeline
    ? stage === 0 ? replica : ((v.id as string | undefined) ?? stageId(replica, stage!))
    : ((v.id as string | undefined) ?? (role === "param-server" ? `ps-${shard}` : `${role}-${hostname().replace(/[^A-Za-z0-9_-]/g, "")}-${process.pid}`))
  const minWorkers = v["min-workers"] === undefined ? undefined : Number(v["min-workers"])
  const bus = TracedBus.layer(NatsBus.layer({ servers, name: `flotilla-${job.job}-${id}`, waitOnFirstConnect: true, auth }))
  // Metrics after Telemetry: its instruments live on the MeterProvider Telemetry starts
  const telemetry = Metrics.layer.pipe(Layer.provideMerge(Telemetry.layer({ role: wireRole(role), instanceId: id, job: job.job })))

  const program = Effect.gen(function* () {
    yield* Effect.logInfo(`launch ${role} ${id} for job ${job.job} on ${servers.join(",")} (${describeAuth(auth)})`)
    const stop = yield* stopRequested(subjects(job.job))
    const actor = yield* runActor(
      { role, id, shard, ...(pipeline ? { stage, replica } : {}) },
      {
        job,
        // only workers and evaluators build it (the backend is not loaded for the other roles)
        compute: Compute.layer(v.backend as BackendPreference | undefined),
        resume: v["no-resume"] !== true,
        minWorkers,
        relay,
        nats: servers,
        natsAuth: auth
      }
    )
    if (finishesOnItsOwn(role)) {
      yield* actor.finished
      return yield* Effect.logInfo(actor.describe())
    }
    const ev = yield* Deferred.await(stop)
    yield* Effect.logInfo(`${id}: stopping (stop #${ev.seq} from ${ev.sender})`)
  })
  return program.pipe(Effect.scoped, Effect.provide(Layer.mergeAll(bus, telemetry)))
}
