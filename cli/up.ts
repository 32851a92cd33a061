/**
 * Implements: `flotilla up` — a job's whole topology (cli/topology.ts) as separate OS
 * processes over NATS, supervised.
 *
 * Starts a local nats-server unless --nats is given, writes the resolved job to
 * runs/<job>/job.json (every process reads the same file), spawns every actor with
 * `flotilla launch`, watches the job (cli/driver.ts) until the final version, pulls the
 * final params for a sample, prints the report (or --json), then stops every process
 * (SIGTERM: they checkpoint and leave cleanly) and the server it started.
 * A child that dies before the job is over is restarted (cli/supervisor.ts: backoff and a
 * restart budget, `--max-restarts`, `--restart-window`), with $FLOTILLA_RESTARTS set to
 * its count of restarts; a restarted parameter server resumes from its checkpoint (the
 * first start of each is a fresh run, --no-resume). `up` fails only when a child's budget
 * is spent, with that child's exits and the tail of its log.
 */
import { spawn, type ChildProcess } from "node:child_process"
import { mkdirSync, writeFileSync } from "node:fs"
import { dirname, join, resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { Deferred, Effect, Layer } from "effect"
import { stopRequested } from "../shared/actor/control-listener.ts"
import { startLocalNatsServer } from "../shared/bus/local-server.ts"
import { NatsBus } from "../shared/bus/nats.ts"
import { Compute, type BackendPreference } from "../shared/compute/backend.ts"
import type { JobConfig } from "../shared/config/job.ts"
import { subjects } from "../shared/protocol/subjects.ts"
import { observeJob } from "./driver.ts"
import { pullParams, report } from "./start.ts"
import { DEFAULT_RESTART_POLICY, supervise, type RestartPolicy } from "./supervisor.ts"
import { checkpointStoreFor, jobActors, type ActorSpec } from "./topology.ts"

const BIN = resolve(dirname(fileURLToPath(import.meta.url)), "..", "bin", "flotilla.ts")

export interface UpOptions {
  readonly job: JobConfig
  readonly jobFile?: string
  readonly nats?: string
  readonly json?: boolean
  readonly codec?: string
  readonly backend?: string
  readonly sample?: number
  readonly runsDir?: string
  /** restart budget and backoff (default DEFAULT_RESTART_POLICY: 10 restarts per child in 5 min). */
  readonly restarts?: Partial<RestartPolicy>
}

/** The last lines a child wrote (across its restarts), for the message when it fails. */
const TAIL_LINES = 40

/** `flotilla launch` arguments of one actor; `restarts` > 0: a restart (a parameter server then resumes). */
export const launchArgs = (spec: ActorSpec, restarts: number, o: { jobFile: string; url: string; codec?: string; backend?: string }): string[] => {
  // --codec is the job's (train.compression.codec): the servers stamp it, every sender follows
  const common = ["--id", spec.id, "--job", o.jobFile, "--nats", o.url, ...(o.codec ? ["--codec", o.codec] : [])]
  const backend = o.backend ? ["--backend", o.backend] : []
  switch (spec.role) {
    case "loader":
    case "scheduler":
    case "quantizer":
      return [spec.role, ...common]
    case "param-server":
      // the first start is a fresh run; a restart resumes from the shard's checkpoint
      return [spec.role, ...common, "--shard", String(spec.shard), ...(restarts === 0 ? ["--no-resume"] : [])]
    case "evaluator":
      return [spec.role, ...common, ...backend]
    case "worker":
      return [spec.role, ...common, ...(spec.stage !== undefined ? ["--stage", String(spec.stage), "--replica", spec.replica ?? "0"] : []), ...backend]
  }
}

export const up = (o: UpOptions) =>
  Effect.gen(function* () {
    const { job } = o
    const startedAt = Date.now()
    const dir = join(o.runsDir ?? "runs", job.job)
    mkdirSync(dir, { recursive: true })
    const jobFile = join(dir, "job.json")
    writeFileSync(jobFile, JSON.stringify(job, null, 2))

    let url = o.nats
    if (!url) {
      const server = yield* Effect.acquireRelease(
        Effect.promise(() => startLocalNatsServer({ jetstream: true })), // JetStream: the control history
        (s) => Effect.promise(() => s.stop())
      )
      url = server.url
      if (!o.json) process.stderr.write(`flotilla up: started nats-server at ${url}\n`)
      // the server it started is supervised too: restarted on the same port (and JetStream
      // store) if it dies; the actors reconnect by themselves. Ends with this command's scope.
      yield* Effect.forkScoped(
        Effect.forever(
          Effect.sleep(1_000).pipe(
            Effect.andThen(Effect.suspend(() => server.running()
              ? Effect.void
              : Effect.sync(() => process.stderr.write(`flotilla up: nats-server at ${server.url} exited; restarting it\n`)).pipe(
                  Effect.andThen(Effect.tryPromise(() => server.restart())),
                  Effect.catch((e) => Effect.sync(() => process.stderr.write(`flotilla up: restarting nats-server failed (${String(e)}); trying again\n`)))
                )
            ))
          )
        )
      )
    }
    const quiet = process.env.FLOTILLA_LOG === undefined
    const specs = jobActors(job)
    const byId = new Map(specs.map((s) => [s.id, s]))
    const tails = new Map<string, string[]>(specs.map((s) => [s.id, []]))
    const policy: RestartPolicy = { ...DEFAULT_RESTART_POLICY, ...o.restarts }

    const spawnChild = (id: string, restarts: number): ChildProcess => {
      const spec = byId.get(id)!
      const proc = spawn(process.execPath, [BIN, "launch", ...launchArgs(spec, restarts, { jobFile, url: url!, codec: o.codec, backend: o.backend })], {
        env: { FLOTILLA_LOG: quiet ? "warn" : "info", ...process.env, FLOTILLA_RESTARTS: String(restarts) },
        stdio: ["ignore", "pipe", "pipe"]
      })
      const tail = tails.get(id)!
      if (restarts > 0) tail.push(`--- restart ${restarts} ---`)
      const onData = (buf: Buffer) => {
        for (const line of buf.toString().split("\n")) {
          if (!line) continue
          tail.push(line)
          if (tail.length > TAIL_LINES) tail.shift()
          if (!quiet || /ERROR|WARN/.test(line)) process.stderr.write(`[${id}] ${line}\n`)
        }
      }
      proc.stdout!.on("data", onData)
      proc.stderr!.on("data", onData)
      return proc
    }

    // the observer's connection lives as long as this command (a plain `provide` would close it at once)
    const driverBus = yield* Layer.build(NatsBus.layer({ servers: url, name: `flotilla-${job.job}-driver` })).pipe(Effect.orDie)
    const observer = yield* observeJob(job, { progress: !o.json }).pipe(Effect.provideContext(driverBus))
    const stop = yield* stopRequested(subjects(job.job)).pipe(Effect.provideContext(driverBus))

    const sup = yield* supervise({
      ids: specs.map((s) => s.id),
      policy,
      spawn: spawnChild,
      log: (line) => process.stderr.write(`${line}\n`),
      tail: (id) => tails.get(id) ?? []
    })
    if (!o.json) process.stderr.write(`flotilla up: ${specs.length} processes: ${specs.map((s) => s.id).join(", ")}\n`)
    // `flotilla ctl <job> stop`: every child exits 0 (servers checkpoint first); nothing is restarted any more
    yield* Effect.forkScoped(Deferred.await(stop).pipe(Effect.andThen(sup.holdRestarts)))

    const result = yield* Effect.raceFirst(
      Deferred.await(observer.done).pipe(Effect.map((summary) => ({ summary, stopped: false }))),
      Effect.raceFirst(Deferred.await(sup.failed), Deferred.await(sup.allDone).pipe(Effect.map(() => ({ summary: observer.summary(), stopped: true }))))
    )
    // the job is over: a child that exits now is not restarted
    yield* sup.holdRestarts
    const params = result.stopped
      ? undefined
      : yield* pullParams(job, "driver").pipe(
          Effect.provide(NatsBus.layer({ servers: url, name: `flotilla-${job.job}-driver-pull` })),
          Effect.orDie
        )
    const store = yield* checkpointStoreFor(job, [url]).pipe(Effect.orDie)
    yield* report(job, result.summary, params, { json: o.json, runsDir: o.runsDir, sample: o.sample, startedAt, store }).pipe(
      Effect.provide(Compute.layer(o.backend as BackendPreference | undefined)),
      Effect.orDie
    )
  }).pipe(Effect.scoped)
