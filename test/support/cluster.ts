// Implements: running a job's actors as SEPARATE OS PROCESSES over a real NATS server, for
// the cross-process tests (test/dp.*.test.ts) and the DP benchmark (bench/dp.ts).
//   - `makeCluster(url, jobPatch)`: resolves the job over the defaults, writes it to a temp
//     dir (checkpoints and any corpus the patch puts there too) and spawns `node
//     bin/flotilla.ts launch <role> --job FILE --nats URL --id ID ...`, keeping every line
//     each process logs (FLOTILLA_LOG=info); SIGTERM/SIGKILL one, stop them all, dump the
//     logs for a failure message.
//   - `observe(url, job)`: a plain NATS subscriber in the test process that records every
//     `ps.*.applied`, `metrics.*`, `errors` and heartbeat message and every train-batch
//     lease (the `data.lease` request and its reply, so a test knows which batch a worker
//     holds); `until(pred)` waits on them; `pull(k)` fetches shard k's params as a worker does.
// Does not own: the NATS server (test/support/nats.ts), the actors, the CLI.
import { decodeTensor } from "../../shared/wire/codecs.ts"
import { spawn, type ChildProcess } from "node:child_process"
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { dirname, join, resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { Effect, Exit, Layer, References, Result, Scope } from "effect"
import { Bus } from "../../shared/bus/Bus.ts"
import { NatsBus } from "../../shared/bus/nats.ts"
import { resolveJob, type JobConfig } from "../../shared/config/job.ts"
import { decodeBytes, decodeValue, encodeMessage, parseJson } from "../../shared/protocol/decode.ts"
import {
  BatchLeased,
  HEADER_BATCH,
  Heartbeat,
  LeaseBatch,
  Rejected,
  StepApplied,
  ValidationLoss,
  WorkerStep
} from "../../shared/protocol/messages.ts"
import { PROTOCOL_VERSION, subjects } from "../../shared/protocol/subjects.ts"
import { requestBundle } from "../../shared/wire/transport.ts"
import { afterAll, beforeAll } from "vitest"
import { acquireNats, type AcquiredNats } from "./nats.ts"

const BIN = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "bin", "flotilla.ts")

export type ActorRole = "loader" | "worker" | "evaluator" | "param-server" | "scheduler" | "quantizer"

export interface ActorExit {
  readonly code: number | null
  readonly signal: NodeJS.Signals | null
}

export interface ActorProcess {
  readonly role: ActorRole
  readonly id: string
  readonly proc: ChildProcess
  /** the flags given after the common ones (`--job`, `--nats`, `--id`), for a relaunch. */
  readonly extra: readonly string[]
  /** the environment added for this process only. */
  readonly env: NodeJS.ProcessEnv
  /** every line it wrote (stdout and stderr), oldest first. */
  readonly lines: string[]
  readonly exited: Promise<ActorExit>
  running(): boolean
  /** SIGTERM (a clean stop: `leaving` heartbeat, checkpoint) and wait for the exit. */
  term(): Promise<ActorExit>
  /** SIGKILL (a crash: nothing is said on the way out) and wait for the exit. */
  kill(): Promise<ActorExit>
  /** Wait until a line matches (already written lines count). */
  waitForLine(re: RegExp, timeoutMs?: number): Promise<string>
}

export interface Cluster {
  readonly job: JobConfig
  readonly jobFile: string
  readonly dir: string
  /** the server URL(s) every actor is given (`--nats`; comma-separated for a cluster). */
  readonly url: string
  readonly actors: ActorProcess[]
  /** `env` is added over the cluster's for this process only. */
  spawn(role: ActorRole, id: string, extra?: readonly string[], env?: NodeJS.ProcessEnv): ActorProcess
  /** loader, scheduler and every PS shard (the actors that run until stopped). */
  spawnServices(): ActorProcess[]
  /** SIGTERM every process still running (SIGKILL after `graceMs`), then remove the dir. */
  stop(graceMs?: number): Promise<void>
  /** The last `n` lines of every process, for a failure message. */
  logs(n?: number): string
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms))

/** Wait until `pred()` holds, checking every `everyMs`; throws `what()` on timeout. */
export const waitUntil = async (pred: () => boolean, timeoutMs: number, what: () => string, everyMs = 25): Promise<void> => {
  const deadline = Date.now() + timeoutMs
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what()}`)
    await sleep(everyMs)
  }
}

/** A job for tests: `patch` over the defaults, checkpoints in `dir`. */
export const testJob = (patch: Record<string, any>, dir: string): JobConfig =>
  resolveJob({ ...patch, train: { checkpointDir: join(dir, "checkpoints"), ...patch.train } }, "test job")

const spawnActor = (
  role: ActorRole,
  id: string,
  args: readonly string[],
  env: NodeJS.ProcessEnv,
  extra: readonly string[] = [],
  own: NodeJS.ProcessEnv = {}
): ActorProcess => {
  const proc = spawn(process.execPath, [BIN, "launch", role, "--id", id, ...args], {
    env: { ...process.env, FLOTILLA_LOG: "info", ...env },
    stdio: ["ignore", "pipe", "pipe"]
  })
  const lines: string[] = []
  const waiters = new Set<{ re: RegExp; done: (line: string) => void }>()
  const onData = (buf: Buffer) => {
    for (const line of buf.toString().split("\n")) {
      if (!line) continue
      lines.push(line)
      for (const w of waiters) if (w.re.test(line)) w.done(line)
    }
  }
  proc.stdout!.on("data", onData)
  proc.stderr!.on("data", onData)
  const exited = new Promise<ActorExit>((res) => proc.once("exit", (code, signal) => res({ code, signal })))
  const running = () => proc.exitCode === null && proc.signalCode === null
  const signal = (sig: NodeJS.Signals) => {
    if (running()) proc.kill(sig)
    return exited
  }
  return {
    role,
    id,
    proc,
    extra,
    env: own,
    lines,
    exited,
    running,
    term: () => signal("SIGTERM"),
    kill: () => signal("SIGKILL"),
    waitForLine: (re, timeoutMs = 30_000) => {
      const found = lines.find((l) => re.test(l))
      if (found !== undefined) return Promise.resolve(found)
      return new Promise<string>((res, rej) => {
        const w = {
          re,
          done: (line: string) => {
            clearTimeout(t)
            waiters.delete(w)
            res(line)
          }
        }
        const t = setTimeout(() => {
          waiters.delete(w)
          rej(new Error(`${id}: no line matching ${re} within ${timeoutMs} ms; its last lines:\n  ${lines.slice(-20).join("\n  ")}`))
        }, timeoutMs)
        waiters.add(w)
      })
    }
  }
}

/**
 * Write the job to a fresh temp dir and get ready to spawn its actors. `patch` may be a
 * function of that dir (to put a corpus file there).
 */
export const makeCluster = (
  url: string,
  patch: Record<string, any> | ((dir: string) => Record<string, any>),
  env: NodeJS.ProcessEnv = {}
): Cluster => {
  const dir = mkdtempSync(join(tmpdir(), "flotilla-dp-"))
  mkdirSync(join(dir, "checkpoints"), { recursive: true })
  const job = testJob(typeof patch === "function" ? patch(dir) : patch, dir)
  const jobFile = join(dir, "job.json")
  writeFileSync(jobFile, JSON.stringify(job, null, 2))
  const actors: ActorProcess[] = []
  const common = ["--job", jobFile, "--nats", url]
  const cluster: Cluster = {
    job,
    jobFile,
    dir,
    url,
    actors,
    spawn: (role, id, extra = [], own = {}) => {
      const a = spawnActor(role, id, [...common, ...extra], { ...env, ...own }, extra, own)
      actors.push(a)
      return a
    },
    spawnServices: () => {
      const out = [cluster.spawn("loader", "loader-0"), cluster.spawn("scheduler", "scheduler-0")]
      for (let k = 0; k < job.topology.psShards; k++) out.push(cluster.spawn("param-server", `ps-${k}`, ["--shard", String(k), "--no-resume"]))
      return out
    },
    stop: async (graceMs = 10_000) => {
      await Promise.all(
        actors.map(async (a) => {
          if (!a.running()) return
          const t = setTimeout(() => a.proc.kill("SIGKILL"), graceMs)
          await a.term()
          clearTimeout(t)
        })
      )
      // FLOTILLA_DRILL_LOGS=<dir>: keep every actor's whole log there (for a drill that failed in CI)
      const keep = process.env["FLOTILLA_DRILL_LOGS"]
      if (keep) {
        mkdirSync(keep, { recursive: true })
        for (const [i, a] of actors.entries()) writeFileSync(join(keep, `${job.job}.${i}.${a.id}.log`), a.lines.join("\n") + "\n")
      }
      rmSync(dir, { recursive: true, force: true })
    },
    logs: (n = 25) => actors.map((a) => `--- ${a.id} (${a.running() ? "running" : `exited ${a.proc.exitCode ?? a.proc.signalCode}`})\n  ${a.lines.slice(-n).join("\n  ")}`).join("\n")
  }
  return cluster
}

// ---------------------------------------------------------------- the observer

export interface LeaseSeen {
  readonly worker: string
  readonly batchId: string
  readonly attempt: number
  readonly at: number
}

export interface MemberSeen {
  readonly role: string
  /** first heartbeat (observer clock, ms). */
  readonly firstAt: number
  lastAt: number
  /** its `leaving` heartbeat, if it sent one. */
  leavingAt?: number
}

export interface Observer {
  /** every StepApplied, all shards, in arrival order. */
  readonly applied: StepApplied[]
  readonly validation: ValidationLoss[]
  readonly workerSteps: WorkerStep[]
  readonly errors: Rejected[]
  /** train batches handed out, in order (from the lease request and its reply). */
  readonly leases: LeaseSeen[]
  /** heartbeats, by actor id. */
  readonly members: Map<string, MemberSeen>
  /** StepApplied of shard k, by version. */
  appliedOf(shard: number): StepApplied[]
  /** The newest version every shard has applied (0 before the first). */
  version(): number
  onLease(f: (l: LeaseSeen) => void): void
  until(pred: () => boolean, timeoutMs: number, what: string | (() => string)): Promise<void>
  /** shard k's current params (a `ps.<k>.pull`, as a joining worker does). */
  pull(shard: number): Promise<{ version: number; params: Map<string, Float32Array> }>
  close(): Promise<void>
}

/** `url` may list several servers, comma-separated (a cluster): any one of them will do. */
export const observe = async (url: string, job: JobConfig): Promise<Observer> => {
  const s = subjects(job.job)
  const scope = Scope.makeUnsafe()
  const quiet = Layer.succeed(References.MinimumLogLevel, "Warn")
  const ctx = await Effect.runPromise(
    Layer.buildWithScope(NatsBus.layer({ servers: url.split(","), name: `flotilla-${job.job}-test-observer` }), scope).pipe(Effect.provide(quiet))
  )
  const run = <A, E>(eff: Effect.Effect<A, E, Bus | Scope.Scope>): Promise<A> =>
    Effect.runPromise(eff.pipe(Scope.provide(scope), Effect.provideContext(ctx)) as Effect.Effect<A, E>)

  const applied: StepApplied[] = []
  const validation: ValidationLoss[] = []
  const workerSteps: WorkerStep[] = []
  const errors: Rejected[] = []
  const leases: LeaseSeen[] = []
  const leaseListeners: Array<(l: LeaseSeen) => void> = []
  const members = new Map<string, MemberSeen>()
  // A lease is a request (worker id, reply inbox) and its reply (batch header): they come
  // on two subscriptions, handled in two fibers, so either may be seen first.
  const inboxes = new Map<string, string>()
  const replies = new Map<string, BatchLeased>()
  const leased = (worker: string, b: BatchLeased) => {
    const l: LeaseSeen = { worker, batchId: b.batchId, attempt: b.attempt, at: Date.now() }
    leases.push(l)
    for (const f of leaseListeners) f(l)
  }

  await run(
    Effect.gen(function* () {
      const bus = yield* Bus
      yield* bus.subscribe(s.psAppliedAll, (m) => {
        const r = decodeBytes(StepApplied, m.subject, m.data)
        if (Result.isSuccess(r)) applied.push(r.success)
        return Effect.void
      })
      yield* bus.subscribe(s.metricsAll, (m) => {
        const j = parseJson(m.data)
        if (Result.isFailure(j)) return Effect.void
        const tag = (j.success as { _tag?: unknown })._tag
        if (tag === "ValidationLoss") {
          const r = decodeValue(ValidationLoss, m.subject, j.success)
          if (Result.isSuccess(r)) validation.push(r.success)
        } else if (tag === "WorkerStep") {
          const r = decodeValue(WorkerStep, m.subject, j.success)
          if (Result.isSuccess(r)) workerSteps.push(r.success)
        }
        return Effect.void
      })
      yield* bus.subscribe(s.errors, (m) => {
        const r = decodeBytes(Rejected, m.subject, m.data)
        if (Result.isSuccess(r)) errors.push(r.success)
        return Effect.void
      })
      yield* bus.subscribe(s.hbAll, (m) => {
        const r = decodeBytes(Heartbeat, m.subject, m.data)
        if (Result.isFailure(r)) return Effect.void
        const now = Date.now()
        const seen = members.get(r.success.id) ?? { role: r.success.role, firstAt: now, lastAt: now }
        seen.lastAt = now
        if (r.success.state === "leaving") seen.leavingAt = now
        members.set(r.success.id, seen)
        return Effect.void
      })
      // a plain (non-queue) subscriber sees every lease request; the reply goes to the
      // requester's inbox, which a `_INBOX.>` subscriber sees as well
      yield* bus.subscribe(s.dataLeaseAny, (m) => {
        const r = decodeBytes(LeaseBatch, m.subject, m.data)
        if (Result.isFailure(r) || r.success.split !== "train" || !m.reply) return Effect.void
        const reply = replies.get(m.reply)
        replies.delete(m.reply)
        if (reply) leased(r.success.worker, reply)
        else inboxes.set(m.reply, r.success.worker)
        return Effect.void
      })
      yield* bus.subscribe("_INBOX.>", (m) => {
        const h = m.headers[HEADER_BATCH]
        if (h === undefined) return Effect.void
        const j = parseJson(new TextEncoder().encode(h))
        if (Result.isFailure(j)) return Effect.void
        const b = decodeValue(BatchLeased, m.subject, j.success)
        if (Result.isFailure(b) || b.success.split !== "train") return Effect.void
        const worker = inboxes.get(m.subject)
        inboxes.delete(m.subject)
        if (worker !== undefined) leased(worker, b.success)
        else replies.set(m.subject, b.success)
        return Effect.void
      })
      yield* bus.flush()
    })
  )

  const appliedOf = (shard: number) => applied.filter((a) => a.shard === shard).sort((a, b) => a.version - b.version)
  return {
    applied,
    validation,
    workerSteps,
    errors,
    leases,
    members,
    appliedOf,
    version: () => {
      let v = Number.POSITIVE_INFINITY
      for (let k = 0; k < job.topology.psShards; k++) v = Math.min(v, Math.max(0, ...appliedOf(k).map((a) => a.version)))
      return v
    },
    onLease: (f) => void leaseListeners.push(f),
    until: (pred, timeoutMs, what) => waitUntil(pred, timeoutMs, typeof what === "string" ? () => what : what),
    pull: (shard) =>
      run(
        Effect.gen(function* () {
          const bus = yield* Bus
          const r = yield* requestBundle(bus, s.psPull(shard), encodeMessage({ _tag: "PullParams", v: PROTOCOL_VERSION, worker: "test-observer", minVersion: 0 }), { timeoutMs: 10_000 })
          const params = new Map<string, Float32Array>()
          for (const t of r.bundle.tensors) params.set(t.name, Float32Array.from(decodeTensor(t))) // bf16 params (train.compression.params) widened
          return { version: r.bundle.meta.version, params }
        })
      ),
    close: () => Effect.runPromise(Scope.close(scope, Exit.void))
  }
}

// ---------------------------------------------------------------- a suite's set-up

/**
 * The set-up every cross-process test file shares: a real NATS server for the file
 * (acquired before its tests, stopped after), and `start(patch, env?)`, which makes the
 * cluster and its observer; both are stopped after the file too.
 */
export const useCluster = () => {
  let nats: AcquiredNats | undefined
  // every cluster a file starts (several tests may each start one): all are stopped after the file
  const started: Array<{ cluster: Cluster; obs?: Observer }> = []
  beforeAll(async () => {
    nats = await acquireNats()
  })
  afterAll(async () => {
    for (const s of started) await s.obs?.close()
    await Promise.all(started.map((s) => s.cluster.stop()))
    await nats?.stop()
  })
  return {
    url: () => nats!.url,
    start: async (patch: Parameters<typeof makeCluster>[1], env: NodeJS.ProcessEnv = {}) => {
      const entry: { cluster: Cluster; obs?: Observer } = { cluster: makeCluster(nats!.url, patch, env) }
      started.push(entry)
      entry.obs = await observe(nats!.url, entry.cluster.job)
      return { cluster: entry.cluster, obs: entry.obs }
    }
  }
}
