/**
 * Implements: `flotilla up` — a job's whole topology as separate OS processes over NATS.
 *
 * Starts a local nats-server unless --nats is given, writes the resolved job to
 * runs/<job>/job.json (every process reads the same file), spawns loader, scheduler,
 * parameter-server shards, an evaluator and the workers with `flotilla launch`, watches
 * the job (cli/driver.ts) until the final version, pulls the final params for a sample,
 * prints the report (or --json), then stops every process (SIGTERM: they checkpoint and
 * leave cleanly) and the server it started. A child that dies early fails the run with
 * the tail of its log.
 */
import { spawn, type ChildProcess } from "node:child_process"
import { mkdirSync, writeFileSync } from "node:fs"
import { dirname, join, resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { Deferred, Effect, Layer } from "effect"
import { startLocalNatsServer } from "../shared/bus/local-server.ts"
import { NatsBus } from "../shared/bus/nats.ts"
import { Compute, type BackendPreference } from "../shared/compute/backend.ts"
import type { JobConfig } from "../shared/config/job.ts"
import { observeJob, type RunSummary } from "./driver.ts"
import { pullParams, report } from "./start.ts"

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
}

interface Child {
  readonly id: string
  readonly proc: ChildProcess
  tail: string[]
}

export const spawnActor = (role: string, id: string, args: string[], env: NodeJS.ProcessEnv, quiet: boolean): Child => {
  const proc = spawn(process.execPath, [BIN, "launch", role, "--id", id, ...args], {
    env: { FLOTILLA_LOG: quiet ? "warn" : "info", ...env },
    stdio: ["ignore", "pipe", "pipe"]
  })
  const c: Child = { id, proc, tail: [] }
  const onData = (buf: Buffer) => {
    for (const line of buf.toString().split("\n")) {
      if (!line) continue
      c.tail.push(line)
      if (c.tail.length > 40) c.tail.shift()
      if (!quiet || /ERROR|WARN/.test(line)) process.stderr.write(`[${id}] ${line}\n`)
    }
  }
  proc.stdout!.on("data", onData)
  proc.stderr!.on("data", onData)
  return c
}

const stopAll = (children: Child[]) =>
  Effect.promise(() =>
    Promise.all(
      children.map(
        (c) =>
          new Promise<void>((res) => {
            if (c.proc.exitCode !== null || c.proc.signalCode !== null) return res()
            const t = setTimeout(() => c.proc.kill("SIGKILL"), 15_000)
            c.proc.once("exit", () => {
              clearTimeout(t)
              res()
            })
            c.proc.kill("SIGTERM")
          })
      )
    )
  )

export const up = (o: UpOptions) =>
  Effect.gen(function* () {
    const { job } = o
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
    }
    const common = ["--job", jobFile, "--nats", url]
    const env: NodeJS.ProcessEnv = { ...process.env }
    const quiet = process.env.FLOTILLA_LOG === undefined
    const children: Child[] = []
    yield* Effect.addFinalizer(() => stopAll(children))

    // the observer's connection lives as long as this command (a plain `provide` would close it at once)
    const driverBus = yield* Layer.build(NatsBus.layer({ servers: url, name: `flotilla-${job.job}-driver` })).pipe(Effect.orDie)
    const observer = yield* observeJob(job, { progress: !o.json }).pipe(Effect.provideContext(driverBus))
    children.push(spawnActor("loader", "loader-0", common, env, quiet))
    children.push(spawnActor("scheduler", "scheduler-0", common, env, quiet))
    for (let k = 0; k < job.topology.psShards; k++) {
      children.push(spawnActor("param-server", `ps-${k}`, [...common, "--shard", String(k), "--no-resume"], env, quiet))
    }
    const backend = o.backend ? ["--backend", o.backend] : []
    if (job.train.evalEvery > 0 && job.data.valBatches > 0 && job.data.valFraction > 0) {
      children.push(spawnActor("evaluator", "evaluator-0", [...common, ...backend], env, quiet))
    }
    const codec = o.codec ? ["--codec", o.codec] : []
    for (let w = 0; w < job.topology.workers; w++) {
      children.push(spawnActor("worker", `worker-${w}`, [...common, ...codec, ...backend], env, quiet))
    }
    if (!o.json) process.stderr.write(`flotilla up: ${children.length} processes: ${children.map((c) => c.id).join(", ")}\n`)

    // a child that dies before the end fails the run
    const died = yield* Deferred.make<never, Error>()
    for (const c of children) {
      c.proc.once("exit", (code, signal) => {
        if (code === 0) return
        Effect.runFork(Deferred.fail(died, new Error(`${c.id} exited (${signal ?? `code ${code}`}):\n  ${c.tail.slice(-15).join("\n  ")}`)))
      })
    }
    // `flotilla ctl <job> stop`: every child exits 0 (servers checkpoint first); report what was trained
    const stopped = yield* Deferred.make<RunSummary>()
    let exited = 0
    for (const c of children) {
      c.proc.once("exit", (code) => {
        if (code === 0 && ++exited === children.length) Effect.runFork(Deferred.succeed(stopped, observer.summary()))
      })
    }
    const summary = yield* Effect.raceFirst(Deferred.await(observer.done), Effect.raceFirst(Deferred.await(died), Deferred.await(stopped)))
    const params = (yield* Deferred.isDone(stopped))
      ? undefined
      : yield* pullParams(job, "driver").pipe(
          Effect.provide(NatsBus.layer({ servers: url, name: `flotilla-${job.job}-driver-pull` })),
          Effect.orDie
        )
    yield* report(job, summary, params, { json: o.json, runsDir: o.runsDir, sample: o.sample }).pipe(
      Effect.provide(Compute.layer(o.backend as BackendPreference | undefined)),
      Effect.orDie
    )
  }).pipe(Effect.scoped)

