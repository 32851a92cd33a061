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
 *
 * Credentials (docs/SECURITY.md). The server `up` starts listens on 127.0.0.1 only and
 * admits only the users it made for this run: one per loader, scheduler, worker and
 * evaluator (bound to its id), one per parameter-server shard, with the least-privilege
 * permissions of shared/bus/permissions.ts and a random password each, in a config file
 * readable by its owner only; each child gets its own user in its environment (never
 * on its command line), and `up` prints how to reach the run with `flotilla ctl` (an
 * operator nkey seed in runs/<job>/operator.nk, mode 0600). With --nats, every process
 * connects with the credentials `up` was given, or, with --account DIR (what `flotilla
 * infra account` wrote), each as its own role.
 */
import { spawn, type ChildProcess } from "node:child_process"
import { randomBytes } from "node:crypto"
import { existsSync, mkdirSync, rmSync, writeFileSync } from "node:fs"
import { dirname, join, resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { Deferred, Effect, Layer } from "effect"
import { stopRequested } from "../shared/actor/control-listener.ts"
import { startLocalNatsServer } from "../shared/bus/local-server.ts"
import { NatsBus, type NatsAuth } from "../shared/bus/nats.ts"
import { newUserKey, secretFile, workerSeedName } from "./infra.ts"
import { accountBlock, MEMBER_ROLES, roleOfActor, type JobRole, type Member, type UserAuth } from "../shared/bus/permissions.ts"
import { authEnv, withoutAuthEnv } from "./auth.ts"
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
  /** with `nats`: the credentials every process connects with. */
  readonly auth?: NatsAuth
  /** with `nats`: a directory `flotilla infra account` wrote; each process connects as its role (`<role>.nk`). */
  readonly account?: string
}

export class UpCredentialsError extends Error {
  readonly _tag = "UpCredentialsError"
}


/** The user an actor connects as on `up`'s own server: its own (MEMBER_ROLES), or its role's. */
const credentialKey = (spec: ActorSpec): string => {
  const role = roleOfActor(spec.role, spec.shard)
  return MEMBER_ROLES.includes(role) ? `${role}:${spec.id}` : role
}

/**
 * Credentials of this run's own server: a random password per user and an operator nkey
 * whose seed goes to `operatorSeedFile` (mode 0600) for `flotilla ctl`. Every loader,
 * scheduler, worker and evaluator has a user of its own (`<job>-<role>-<id>`: it heartbeats
 * only as itself, a worker hears only its own acks and its replica's pipeline), each shard
 * its `ps-k` user, `up` itself the driver's. Returns the server's account config and each
 * user's credential, by credentialKey (and "driver", "operator").
 */
export const localCredentials = (job: JobConfig, specs: ReadonlyArray<ActorSpec>, operatorSeedFile: string): { config: string; auth: Map<string, NatsAuth> } => {
  const auth = new Map<string, NatsAuth>()
  const users: Array<{ role: JobRole; auth: UserAuth; member?: Member }> = []
  const add = (key: string, role: JobRole, member?: Member) => {
    if (auth.has(key)) return
    const user = member ? `${job.job}-${role}-${member.id}` : `${job.job}-${role}`
    const password = randomBytes(24).toString("base64url")
    auth.set(key, { user, password })
    users.push({ role, auth: { kind: "password", user, password }, ...(member ? { member } : {}) })
  }
  for (const spec of specs) {
    const role = roleOfActor(spec.role, spec.shard)
    if (MEMBER_ROLES.includes(role)) add(credentialKey(spec), role, { id: spec.id, ...(spec.replica !== undefined ? { replica: spec.replica } : {}) })
    else add(role, role)
  }
  add("driver", "driver")
  const operator = newUserKey()
  secretFile(operatorSeedFile, `${operator.seed}\n`)
  auth.set("operator", { nkey: operatorSeedFile })
  users.push({ role: "operator", auth: { kind: "nkey", nkey: operator.publicKey } })
  return { config: `accounts {\n${accountBlock(job.job, users)}}\n`, auth }
}

/**
 * With --account DIR: each role's seed file there, all checked before anything starts; a
 * worker's own (`worker.<id>.nk`, infra account --workers) before the shared `worker.nk`.
 * Keyed as localCredentials keys them.
 */
const accountCredentials = (dir: string, specs: ReadonlyArray<ActorSpec>): Map<string, NatsAuth> => {
  const out = new Map<string, NatsAuth>()
  const need = (key: string, files: string[]) => {
    const file = files.map((f) => join(dir, f)).find((f) => existsSync(f))
    if (file === undefined) throw new UpCredentialsError(`--account ${dir}: no ${files.join(" or ")} there (\`flotilla infra account <job> --shards K [--workers IDS] --out ${dir}\` writes one per role)`)
    out.set(key, { nkey: file })
  }
  for (const spec of specs) {
    const role = roleOfActor(spec.role, spec.shard)
    if (role === "worker") need(credentialKey(spec), [workerSeedName(spec.id), "worker.nk"])
    else need(credentialKey(spec), [`${role}.nk`])
  }
  need("driver", ["driver.nk"])
  return out
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

    const specs = jobActors(job)
    let url = o.nats
    /** each role's credentials; undefined: every process uses o.auth. */
    let credentials: Map<string, NatsAuth> | undefined
    if (url && o.account) credentials = yield* Effect.try({ try: () => accountCredentials(o.account!, specs), catch: (e) => e as UpCredentialsError })
    if (!url) {
      const operatorSeed = join(dir, "operator.nk")
      const local = localCredentials(job, specs, operatorSeed)
      credentials = local.auth
      // the seed is of this run's server only: gone with it
      yield* Effect.addFinalizer(() => Effect.sync(() => rmSync(operatorSeed, { force: true })))
      const server = yield* Effect.acquireRelease(
        // loopback only; JetStream: the control history. The config (with the passwords) is mode 0600.
        Effect.promise(() => startLocalNatsServer({ host: "127.0.0.1", jetstream: true, extraConfig: local.config })),
        (s) => Effect.promise(() => s.stop())
      )
      url = server.url
      process.stderr.write(`flotilla up: started nats-server at ${url} (credentials required; control this run with \`flotilla ctl ${job.job} status --nats ${url} --nkey ${operatorSeed}\`)\n`)
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
    // an actor's own user on up's server; its role's with --account; o.auth for every process otherwise
    const authOf = (spec: ActorSpec): NatsAuth | undefined => (credentials ? credentials.get(credentialKey(spec)) : o.auth)
    const driverAuth = credentials ? credentials.get("driver") : o.auth
    const byId = new Map(specs.map((s) => [s.id, s]))
    const tails = new Map<string, string[]>(specs.map((s) => [s.id, []]))
    const policy: RestartPolicy = { ...DEFAULT_RESTART_POLICY, ...o.restarts }

    const spawnChild = (id: string, restarts: number): ChildProcess => {
      const spec = byId.get(id)!
      const proc = spawn(process.execPath, [BIN, "launch", ...launchArgs(spec, restarts, { jobFile, url: url!, codec: o.codec, backend: o.backend })], {
        // its own credential only, in its environment (not on its command line)
        env: { FLOTILLA_LOG: quiet ? "warn" : "info", ...withoutAuthEnv(process.env), ...authEnv(authOf(spec)), FLOTILLA_RESTARTS: String(restarts), FLOTILLA_SUPERVISOR_PID: String(process.pid) },
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
    const driverBus = yield* Layer.build(NatsBus.layer({ servers: url, name: `flotilla-${job.job}-driver`, auth: driverAuth })).pipe(Effect.orDie)
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
          Effect.provide(NatsBus.layer({ servers: url, name: `flotilla-${job.job}-driver-pull`, auth: driverAuth })),
          Effect.orDie
        )
    const store = yield* checkpointStoreFor(job, [url], driverAuth).pipe(Effect.orDie)
    yield* report(job, result.summary, params, { json: o.json, runsDir: o.runsDir, sample: o.sample, startedAt, store }).pipe(
      Effect.provide(Compute.layer(o.backend as BackendPreference | undefined)),
      Effect.orDie
    )
  }).pipe(Effect.scoped)
