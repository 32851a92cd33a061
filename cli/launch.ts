/**
 * Implements: `flotilla launch <role>` — one actor as its own process, joining a job
 * over NATS. The same actor code `flotilla start` runs in-process; only the Bus layer
 * differs. Workers and evaluators exit when the job's final version is out; the other
 * roles run until SIGTERM/SIGINT (a parameter server checkpoints on the way out). Every
 * role exits cleanly (code 0) on `flotilla ctl <job> stop`. The scheduler's process also
 * runs the job's controller (actors/controller), its history in JetStream when the
 * server has it.
 */
import { existsSync } from "node:fs"
import { hostname } from "node:os"
import { Deferred, Effect, Layer } from "effect"
import { runController } from "../actors/controller/controller.ts"
import { runLoader } from "../actors/loader/loader.ts"
import { runParamServer } from "../actors/param-server/server.ts"
import { runScheduler } from "../actors/scheduler/scheduler.ts"
import { runWorker } from "../actors/worker/worker.ts"
import { stopRequested } from "../shared/actor/control-listener.ts"
import { NatsBus } from "../shared/bus/nats.ts"
import { Compute, type BackendPreference } from "../shared/compute/backend.ts"
import { loadJobFile, resolveJob, type JobConfig } from "../shared/config/job.ts"
import { subjects } from "../shared/protocol/subjects.ts"
import { Metrics } from "../shared/telemetry/metrics.ts"
import { Telemetry } from "../shared/telemetry/otel.ts"
import { TracedBus } from "../shared/telemetry/traced-bus.ts"
import type { Codec } from "../shared/wire/tensor.ts"
import { UsageError } from "./main.ts"

export const ROLES = ["loader", "worker", "evaluator", "param-server", "scheduler"] as const

export const jobFromFlag = (flag: string | undefined): JobConfig => {
  if (!flag) throw new UsageError("--job is required: a job file (JSON/YAML) or a job name")
  return existsSync(flag) ? loadJobFile(flag) : resolveJob({ job: flag }, `--job ${flag}`)
}

export const codecFromFlag = (c: unknown): Codec => {
  if (c === undefined || c === "f32") return "f32"
  if (c === "int8" || c === "int8-block") return "int8-block"
  throw new UsageError(`--codec must be f32 or int8, got ${JSON.stringify(c)}`)
}

export const launch = (o: { role: string; values: Record<string, unknown> }) => {
  const v = o.values
  if (!(ROLES as readonly string[]).includes(o.role)) throw new UsageError(`unknown role ${JSON.stringify(o.role)}: one of ${ROLES.join(", ")}`)
  const job = jobFromFlag(v.job as string | undefined)
  const servers = String(v.nats ?? process.env.NATS_URL ?? "nats://127.0.0.1:4222").split(",")
  const shard = v.shard === undefined ? 0 : Number(v.shard)
  if (!(Number.isInteger(shard) && shard >= 0 && shard < job.topology.psShards)) {
    throw new UsageError(`--shard must be in [0, ${job.topology.psShards}) for this job, got ${v.shard}`)
  }
  const role = o.role
  const id = (v.id as string | undefined) ?? `${role === "param-server" ? `ps${shard}` : role}-${hostname().replace(/[^A-Za-z0-9_-]/g, "")}-${process.pid}`
  const codec = codecFromFlag(v.codec)
  const bus = TracedBus.layer(NatsBus.layer({ servers, name: `flotilla-${job.job}-${id}`, waitOnFirstConnect: true }))
  // Metrics after Telemetry: its instruments live on the MeterProvider Telemetry starts
  const telemetry = Metrics.layer.pipe(
    Layer.provideMerge(Telemetry.layer({ role: role === "param-server" ? "ps" : role, instanceId: id, job: job.job }))
  )

  const program = Effect.gen(function* () {
    yield* Effect.logInfo(`launch ${role} ${id} for job ${job.job} on ${servers.join(",")}`)
    const stop = yield* stopRequested(subjects(job.job))
    const untilStop = Deferred.await(stop).pipe(Effect.flatMap((ev) => Effect.logInfo(`${id}: stopping (stop #${ev.seq} from ${ev.sender})`)))
    switch (role) {
      case "loader":
        yield* runLoader({ job, id })
        return yield* untilStop
      case "scheduler":
        yield* runScheduler({ job, id })
        yield* runController({ job, id: `${id}-controller`, nats: servers })
        return yield* untilStop
      case "param-server": {
        const minWorkers = v["min-workers"] === undefined ? undefined : Number(v["min-workers"])
        yield* runParamServer({ job, shard, id, resume: v["no-resume"] !== true, minWorkers })
        return yield* untilStop
      }
      case "worker":
      case "evaluator": {
        const h = yield* runWorker({ job, id, mode: role === "evaluator" ? "eval" : "train", codec }).pipe(
          Effect.provide(Compute.layer(v.backend as BackendPreference | undefined))
        )
        yield* Deferred.await(h.finished)
        yield* Effect.logInfo(`${id}: done (${h.stats.steps} steps, ${h.stats.stale} stale, ${h.stats.bytesSent} bytes sent)`)
        return
      }
    }
  })
  return program.pipe(Effect.scoped, Effect.provide(Layer.mergeAll(bus, telemetry)))
}
