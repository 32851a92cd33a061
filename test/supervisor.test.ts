// Checks: `flotilla up`'s supervision (cli/supervisor.ts) and the end-of-run summary's checkpoint.
//   - the policy, a pure reducer, without processes or clocks: backoff 250 ms doubling to
//     8 s and reset after 30 s up, the restart budget per window, exit 0 = done, no
//     restarts once held, the log line;
//   - its shell over real (tiny `node -e`) processes: restarts until a child succeeds,
//     gives up with the child's last lines when the budget is spent;
//   - `runCheckpoints`: the summary names this run's checkpoint, not a newer-version file
//     an earlier run of the same job left;
//   - a real `flotilla up` (own processes over NATS): the test SIGKILLs worker-0 (found by
//     its command line), up restarts it with FLOTILLA_RESTARTS=1, `ctl status` shows the
//     restart, and the job completes (exit 0, the summary printed); the same for ps-0
//     SIGKILLed at version 15, which is restarted without --no-resume and resumes.
// Run: npx vitest run test/supervisor.test.ts   (~30-60 s on 2 cores)
import { execFileSync, spawn } from "node:child_process"
import { mkdirSync, mkdtempSync, readFileSync, rmSync, utimesSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { dirname, join, resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { Deferred, Effect, Exit, Layer, References, Result } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { Bus } from "../shared/bus/Bus.ts"
import { NatsBus } from "../shared/bus/nats.ts"
import { resolveJob } from "../shared/config/job.ts"
import { restartPolicyFromArgs } from "../cli/main.ts"
import { requestControl } from "../cli/ctl.ts"
import { runCheckpoints } from "../cli/start.ts"
import {
  DEFAULT_RESTART_POLICY,
  init,
  step,
  supervise,
  type RestartPolicy,
  type SupervisorEffect,
  type SupervisorEvent,
  type SupervisorState
} from "../cli/supervisor.ts"
import { launchArgs } from "../cli/up.ts"
import { jobActors } from "../cli/topology.ts"
import { acquireNats, type AcquiredNats } from "./support/nats.ts"
import { observe, waitUntil, type Observer } from "./support/cluster.ts"
import { drillCorpus } from "./support/drill-job.ts"

const BIN = resolve(dirname(fileURLToPath(import.meta.url)), "..", "bin", "flotilla.ts")

// ---------------------------------------------------------------- the policy

/** Feed events through the reducer; returns the last state and every effect, in order. */
const run = (st: SupervisorState, events: SupervisorEvent[]): [SupervisorState, SupervisorEffect[]] => {
  const out: SupervisorEffect[] = []
  for (const ev of events) {
    const [next, effects] = step(st, ev)
    st = next
    out.push(...effects)
  }
  return [st, out]
}
const killed = (id: string, at: number): SupervisorEvent => ({ _tag: "ChildExited", id, code: null, signal: "SIGKILL", at })
const due = (id: string, at: number): SupervisorEvent => ({ _tag: "RestartDue", id, at })
const delays = (effects: SupervisorEffect[]) => effects.flatMap((e) => (e._tag === "StartTimer" ? [e.delayMs] : []))

describe("the restart policy (pure)", () => {
  const policy: RestartPolicy = DEFAULT_RESTART_POLICY

  it("spawns every child, restarts a killed one after 250 ms with its count, and logs why", () => {
    const [s0, first] = init(policy, ["ps-0", "worker-0"], 0)
    expect(first).toEqual([{ _tag: "Spawn", id: "ps-0", restarts: 0 }, { _tag: "Spawn", id: "worker-0", restarts: 0 }])
    const [s1, e1] = step(s0, killed("ps-0", 1_000))
    expect(e1).toEqual([
      { _tag: "Log", line: "flotilla up: restarting ps-0 (exited SIGKILL), restart 1/10 in 250 ms" },
      { _tag: "StartTimer", id: "ps-0", delayMs: 250 }
    ])
    expect(s1.children.get("ps-0")!.status).toBe("backoff")
    const [s2, e2] = step(s1, due("ps-0", 1_250))
    expect(e2).toEqual([{ _tag: "Spawn", id: "ps-0", restarts: 1 }])
    expect(s2.children.get("ps-0")).toMatchObject({ status: "running", startedAt: 1_250, restarts: 1 })
    // a code, not a signal
    const [, e3] = step(s2, { _tag: "ChildExited", id: "ps-0", code: 1, signal: null, at: 2_000 })
    expect(e3[0]).toEqual({ _tag: "Log", line: "flotilla up: restarting ps-0 (exited code 1), restart 2/10 in 500 ms" })
  })

  it("doubles the backoff up to 8 s, and starts over once a child stayed up 30 s", () => {
    let [st] = init({ ...policy, maxRestarts: 100, windowMs: 1e9 }, ["w"], 0)
    let t = 0
    const seen: number[] = []
    for (let i = 0; i < 8; i++) {
      t += 100 // dies 100 ms after each start
      const [a, e] = run(st, [killed("w", t)])
      seen.push(...delays(e))
      t += delays(e)[0]
      ;[st] = run(a, [due("w", t)])
    }
    expect(seen).toEqual([250, 500, 1_000, 2_000, 4_000, 8_000, 8_000, 8_000])
    // up 30 s: back to 250 ms, then doubling again
    t += 30_000
    const [a, e] = run(st, [killed("w", t)])
    expect(delays(e)).toEqual([250])
    const [b] = run(a, [due("w", t + 250)])
    expect(delays(run(b, [killed("w", t + 400)])[1])).toEqual([500])
  })

  it("gives up when a child dies more than maxRestarts times within the window, naming it and its exits", () => {
    let [st] = init({ ...policy, maxRestarts: 3, windowMs: 60_000 }, ["ps-0", "worker-0"], 0)
    let t = 0
    for (let i = 0; i < 3; i++) {
      const [a, e] = run(st, [killed("ps-0", (t += 1_000))])
      expect(e.map((x) => x._tag)).toEqual(["Log", "StartTimer"])
      ;[st] = run(a, [due("ps-0", (t += delays(e)[0]))])
    }
    const [failed, e] = run(st, [{ _tag: "ChildExited", id: "ps-0", code: 1, signal: null, at: (t += 1_000) }])
    expect(e).toHaveLength(1)
    const give = e[0] as Extract<SupervisorEffect, { _tag: "GiveUp" }>
    expect(give._tag).toBe("GiveUp")
    expect(give.id).toBe("ps-0")
    expect(give.reason).toMatch(/^ps-0 died 4 times within 1 min: its restart budget \(3 restarts per 1 min\) is spent; its last exits: SIGKILL after 1\.0 s, SIGKILL after .*, code 1 after /)
    expect(failed.children.get("ps-0")!.status).toBe("failed")
    expect(failed.children.get("worker-0")!.status).toBe("running")
  })

  it("forgets restarts older than the window", () => {
    let [st] = init({ ...policy, maxRestarts: 2, windowMs: 10_000 }, ["w"], 0)
    let t = 0
    // one death every 6 s: never more than 2 within 10 s
    for (let i = 0; i < 6; i++) {
      const [a, e] = run(st, [killed("w", (t += 6_000))])
      expect(e.map((x) => x._tag), `death ${i + 1}`).toEqual(["Log", "StartTimer"])
      ;[st] = run(a, [due("w", (t += delays(e)[0]))])
    }
    expect(st.children.get("w")!.restarts).toBe(6)
  })

  it("with --max-restarts 0 the first death fails the run", () => {
    const [st] = init({ ...policy, maxRestarts: 0 }, ["loader-0"], 0)
    const [, e] = step(st, killed("loader-0", 2_000))
    expect(e).toEqual([{ _tag: "GiveUp", id: "loader-0", reason: "loader-0 exited (SIGKILL) after 2.0 s, and restarts are off (--max-restarts 0)" }])
  })

  it("exit 0 is done (no restart); when every child is done, AllDone", () => {
    const [st] = init(policy, ["worker-0", "worker-1"], 0)
    const [a, e1] = step(st, { _tag: "ChildExited", id: "worker-0", code: 0, signal: null, at: 5 })
    expect(e1).toEqual([])
    expect(a.children.get("worker-0")!.status).toBe("done")
    const [, e2] = step(a, { _tag: "ChildExited", id: "worker-1", code: 0, signal: null, at: 6 })
    expect(e2).toEqual([{ _tag: "AllDone" }])
  })

  it("once restarts are held, nothing is spawned: deaths stay down, a pending restart is dropped", () => {
    const [st] = init(policy, ["ps-0", "worker-0", "loader-0"], 0)
    const [a] = step(st, killed("ps-0", 100)) // in backoff
    const [b, e] = step(a, { _tag: "HoldRestarts", at: 200 })
    expect(e).toEqual([{ _tag: "Holding" }])
    expect(b.children.get("ps-0")!.status).toBe("stopped")
    const [c, e2] = run(b, [due("ps-0", 350), killed("worker-0", 400)])
    expect(e2).toEqual([])
    expect(c.children.get("worker-0")!.status).toBe("stopped")
    const [, e3] = step(c, { _tag: "ChildExited", id: "loader-0", code: 0, signal: null, at: 500 })
    expect(e3).toEqual([{ _tag: "AllDone" }])
  })

  it("--max-restarts and --restart-window", () => {
    expect(restartPolicyFromArgs({})).toEqual({})
    expect(restartPolicyFromArgs({ "max-restarts": "0", "restart-window": "90" })).toEqual({ maxRestarts: 0, windowMs: 90_000 })
    expect(restartPolicyFromArgs({ "restart-window": "5m" })).toEqual({ windowMs: 300_000 })
    expect(restartPolicyFromArgs({ "restart-window": "1500ms" })).toEqual({ windowMs: 1_500 })
    expect(() => restartPolicyFromArgs({ "max-restarts": "-1" })).toThrow(/--max-restarts must be an integer >= 0/)
    expect(() => restartPolicyFromArgs({ "restart-window": "soon" })).toThrow(/--restart-window must be a duration/)
  })

  it("a parameter server starts fresh (--no-resume) and resumes when restarted", () => {
    const job = resolveJob({ job: "sup-args", topology: { workers: 2, psShards: 2 } }, "test")
    expect(jobActors(job).map((a) => a.id)).toEqual(["loader-0", "scheduler-0", "ps-0", "ps-1", "evaluator-0", "worker-0", "worker-1"])
    const ps1 = jobActors(job).find((a) => a.id === "ps-1")!
    const o = { jobFile: "j.json", url: "nats://x:1" }
    expect(launchArgs(ps1, 0, o)).toEqual(["param-server", "--id", "ps-1", "--job", "j.json", "--nats", "nats://x:1", "--shard", "1", "--no-resume"])
    expect(launchArgs(ps1, 1, o)).not.toContain("--no-resume")
  })
})

// ---------------------------------------------------------------- the shell, over real processes

/** A child that fails until its FLOTILLA_RESTARTS reaches `okAt` (never when undefined). */
const flaky = (okAt: number | undefined) => (id: string, restarts: number) =>
  spawn(process.execPath, ["-e", `console.log("${id} try ${restarts}"); process.exit(${okAt === undefined ? 1 : `${restarts} >= ${okAt} ? 0 : 3`})`], {
    env: { ...process.env, FLOTILLA_RESTARTS: String(restarts) },
    stdio: ["ignore", "pipe", "pipe"]
  })

const shell = (okAt: number | undefined, policy: RestartPolicy) =>
  Effect.gen(function* () {
    const logs: string[] = []
    const tails = new Map<string, string[]>()
    const sup = yield* supervise({
      ids: ["a"],
      policy,
      spawn: (id, restarts) => {
        const p = flaky(okAt)(id, restarts)
        p.stdout!.on("data", (b: Buffer) => (tails.get(id) ?? tails.set(id, []).get(id)!).push(b.toString().trim()))
        return p
      },
      log: (l) => logs.push(l),
      tail: (id) => tails.get(id) ?? []
    })
    const exit = yield* Effect.exit(Effect.raceFirst(Deferred.await(sup.allDone), Deferred.await(sup.failed)))
    return { exit, logs, state: sup.state() }
  }).pipe(Effect.scoped)

describe("the supervisor's shell (real processes)", () => {
  const fast: RestartPolicy = { maxRestarts: 3, windowMs: 60_000, backoffMs: 20, backoffMaxMs: 100, resetAfterMs: 30_000 }

  it("restarts a failing child until it succeeds", async () => {
    const r = await Effect.runPromise(shell(2, fast))
    expect(Exit.isSuccess(r.exit)).toBe(true)
    expect(r.logs).toEqual([
      "flotilla up: restarting a (exited code 3), restart 1/3 in 20 ms",
      "flotilla up: restarting a (exited code 3), restart 2/3 in 40 ms"
    ])
    expect(r.state.children.get("a")).toMatchObject({ status: "done", restarts: 2 })
  }, 20_000)

  it("gives up when the budget is spent, with the child's last lines", async () => {
    const r = await Effect.runPromise(shell(undefined, fast))
    expect(Exit.isFailure(r.exit)).toBe(true)
    const msg = Exit.isFailure(r.exit) ? String((r.exit.cause.reasons[0] as { error?: Error }).error?.message) : ""
    expect(msg).toMatch(/^a died 4 times within 1 min: its restart budget \(3 restarts per 1 min\) is spent/)
    expect(msg).toContain("the last lines of a:\n  a try 0")
    expect(msg).toContain("a try 3")
    expect(r.logs).toHaveLength(3)
  }, 20_000)
})

// ---------------------------------------------------------------- deliverable 11: this run's checkpoint

describe("the summary's checkpoint", () => {
  it("is the newest one this run wrote, not a higher version an earlier run left", async () => {
    const dir = mkdtempSync(join(tmpdir(), "flotilla-sup-ckpt-"))
    try {
      const job = resolveJob({ job: "sup-ckpt", train: { checkpointDir: dir } }, "test")
      const shard = join(dir, "sup-ckpt", "ps-0")
      mkdirSync(shard, { recursive: true })
      const old = join(shard, "v00000300.ckpt")
      writeFileSync(old, "earlier run")
      const past = (Date.now() - 3_600_000) / 1000
      utimesSync(old, past, past)
      const since = Date.now() - 1
      expect(await Effect.runPromise(runCheckpoints(job, since))).toEqual([undefined])
      writeFileSync(join(shard, "v00000100.ckpt"), "this run")
      const [mine] = await Effect.runPromise(runCheckpoints(job, since))
      expect(mine?.where).toBe(join(shard, "v00000100.ckpt"))
      expect(mine?.version).toBe(100)
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
  })
})

// ---------------------------------------------------------------- a real `flotilla up`

/** ~1.6 kB of text: 100 windows of 16 tokens, 25 batches of 4 per epoch (the drills' corpus). */
const corpusText = drillCorpus

/** The pid of `parent`'s child running `flotilla launch <role> --id <id>`, if any. */
const childPid = (parent: number, role: string, id: string): number | undefined => {
  try {
    const out = execFileSync("pgrep", ["-P", String(parent), "-f", `launch ${role} --id ${id}( |$)`]).toString().trim()
    return out ? Number(out.split("\n")[0]) : undefined
  } catch {
    return undefined // pgrep exits 1 when nothing matches
  }
}
const commandLine = (pid: number) => readFileSync(`/proc/${pid}/cmdline`).toString().split("\0")
const envOf = (pid: number) =>
  Object.fromEntries(readFileSync(`/proc/${pid}/environ`).toString().split("\0").filter(Boolean).map((kv) => [kv.slice(0, kv.indexOf("=")), kv.slice(kv.indexOf("=") + 1)]))

describe("flotilla up restarts a killed actor (own processes over NATS)", () => {
  let nats: AcquiredNats
  let dir: string
  beforeAll(async () => {
    nats = await acquireNats({ jetstream: true })
    dir = mkdtempSync(join(tmpdir(), "flotilla-sup-up-"))
  })
  afterAll(async () => {
    await nats?.stop()
    if (dir) rmSync(dir, { recursive: true, force: true })
  })

  const STEPS = 100

  /** `flotilla up` of a tiny 1-worker job in its own dir; kill `victim` at version `killAt`, wait for its restart. */
  const upAndKill = async (name: string, role: string, victim: string, killAt = 5) => {
    const cwd = join(dir, name)
    mkdirSync(cwd, { recursive: true })
    const corpus = join(cwd, "corpus.txt")
    writeFileSync(corpus, corpusText())
    const patch = {
      job: `${name}-${process.pid}`,
      model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 },
      data: { corpus, batchSize: 4, valFraction: 0, valBatches: 1 },
      train: { steps: STEPS, evalEvery: 0, checkpointEvery: 10, checkpointDir: join(cwd, "checkpoints"), heartbeatMs: 200, livenessMs: 2_000, leaseTimeoutMs: 3_000 },
      schedule: { kind: "constant", lr: 3e-3 },
      topology: { workers: 1, psShards: 1 }
    }
    const job = resolveJob(patch, "test")
    const jobFile = join(cwd, "job.json")
    writeFileSync(jobFile, JSON.stringify(patch))
    const obs: Observer = await observe(nats.url, job)
    const up = spawn(process.execPath, [BIN, "up", jobFile, "--nats", nats.url, "--json", "--sample", "0", "--max-restarts", "3"], {
      cwd,
      env: { ...process.env, FLOTILLA_LOG: undefined, FLOTILLA_RESTARTS: undefined },
      stdio: ["ignore", "pipe", "pipe"]
    })
    let stdout = ""
    let stderr = ""
    up.stdout!.on("data", (b: Buffer) => (stdout += b.toString()))
    up.stderr!.on("data", (b: Buffer) => (stderr += b.toString()))
    const exited = new Promise<number | null>((res) => up.once("exit", (code) => res(code)))
    const why = () => `\n(at version ${obs.version()}; up's stderr:)\n${stderr.slice(-4_000)}`
    try {
      await obs.until(() => obs.version() >= killAt, 90_000, () => `version ${killAt}${why()}`)
      const first = childPid(up.pid!, role, victim)
      expect(first, `${victim}'s process (a child of up)`).toBeDefined()
      expect(envOf(first!).FLOTILLA_RESTARTS).toBe("0")
      process.kill(first!, "SIGKILL")
      await waitUntil(() => /restarting/.test(stderr), 20_000, () => `up's restart line${why()}`)
      expect(stderr).toContain(`flotilla up: restarting ${victim} (exited SIGKILL), restart 1/3 in 250 ms`)
      let second: number | undefined
      await waitUntil(() => (second = childPid(up.pid!, role, victim)) !== undefined && second !== first, 20_000, () => `a new ${victim} process${why()}`)
      expect(envOf(second!).FLOTILLA_RESTARTS).toBe("1")
      return { job, obs, up, exited, stdout: () => stdout, stderr: () => stderr, second: second!, why }
    } catch (e) {
      up.kill("SIGKILL")
      await obs.close()
      throw e
    }
  }

  const statusOf = (job: string) =>
    Effect.runPromise(
      Effect.gen(function* () {
        const bus = yield* Bus
        return yield* requestControl(bus, job, "status", {}, { timeoutMs: 2_000 })
      }).pipe(
        Effect.scoped,
        Effect.provide(NatsBus.layer({ servers: nats.url, name: "sup-test-ctl" })),
        Effect.provide(Layer.succeed(References.MinimumLogLevel, "Warn")),
        Effect.result
      )
    )

  /** up's exit code and its --json summary, once it exits (at most 2 min). */
  const finish = async (r: Awaited<ReturnType<typeof upAndKill>>) => {
    const code = await Promise.race([r.exited, new Promise<"timeout">((res) => setTimeout(() => res("timeout"), 120_000))])
    expect(code, `up's exit${r.why()}`).toBe(0)
    return JSON.parse(r.stdout().trim().split("\n").pop()!)
  }

  /** Ask the controller for worker-0's restart count until it says `n` (or `until` ms pass). */
  const awaitRestartsInStatus = async (job: string, id: string, n: number, timeoutMs: number): Promise<number | undefined> => {
    const deadline = Date.now() + timeoutMs
    let seen: number | undefined
    while (Date.now() < deadline) {
      const st = await statusOf(job)
      if (Result.isSuccess(st) && st.success._tag === "JobStatus") {
        seen = st.success.actors.find((a) => a.id === id)?.restarts
        if (seen === n) return seen
      }
      await new Promise((res) => setTimeout(res, 200))
    }
    return seen
  }

  it("SIGKILLed worker-0 is restarted (FLOTILLA_RESTARTS=1, shown by ctl status) and the job completes", async () => {
    const r = await upAndKill("sup-worker", "worker", "worker-0")
    try {
      expect(await awaitRestartsInStatus(r.job.job, "worker-0", 1, 20_000), `ctl status: worker-0's restarts${r.why()}`).toBe(1)
      const summary = await finish(r)
      expect(summary.steps).toBe(STEPS)
      expect(summary.checkpoint, "this run's final checkpoint").toMatch(/ps-0\/v0*100\.ckpt$/)
      expect(r.obs.version()).toBe(STEPS)
    } finally {
      r.up.kill("SIGKILL")
      await r.obs.close()
    }
  }, 240_000)

  // Deliverable 2's path under supervision: the workers accept the resumed, lower version
  // and the loader re-serves the batches applied after the checkpoint (v10 at the kill).
  it(
    "SIGKILLed ps-0 is restarted WITHOUT --no-resume (it resumes from its checkpoint) and the job completes",
    async () => {
      const r = await upAndKill("sup-ps", "param-server", "ps-0", 15)
      try {
        const argv = commandLine(r.second)
        expect(argv).toContain("--shard")
        expect(argv, "a restarted parameter server resumes").not.toContain("--no-resume")
        const summary = await finish(r)
        expect(summary.steps).toBe(STEPS)
        expect(summary.checkpoint, "this run's final checkpoint").toMatch(/ps-0\/v0*100\.ckpt$/)
      } finally {
        r.up.kill("SIGKILL")
        await r.obs.close()
      }
    },
    240_000
  )
})
