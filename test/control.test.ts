// Implements: the control plane over a real NATS server (with JetStream) — a tiny GPT job
// whose actors run in this process on a NatsBus, steered with the ctl client
// (`requestControl`): a live set-lr changes the LR of the next steps (and exactly from
// `fromStep`); pause holds the version, resume continues it; reduce-on-plateau lowers
// the LR when validation loss stalls; set-optimizer / set-consistency / set-schedule /
// checkpoint reach the servers and the scheduler; status shows the topology; the
// history (a JetStream stream) lists accepted commands with sender and time and outlives
// its controller; stop finishes workers and checkpoints servers.
// Run: npx vitest run test/control.test.ts
// Does not own: bad control messages (test/control.bad-messages.test.ts), stop across
// processes (test/control.stop.test.ts).
import { existsSync, readdirSync } from "node:fs"
import { join } from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "@effect/vitest"
import { Deferred, Effect } from "effect"
import { runController } from "../actors/controller/controller.ts"
import { Bus, type BusShape } from "../shared/bus/Bus.ts"
import type { ControlVerb, ControlReply } from "../shared/protocol/control.ts"
import { decodeBytes, encodeMessage } from "../shared/protocol/decode.ts"
import { LrForStep, type ValidationLoss } from "../shared/protocol/messages.ts"
import { PROTOCOL_VERSION, subjects } from "../shared/protocol/subjects.ts"
import { formatHistory, formatStatus, requestControl } from "../cli/ctl.ts"
import { jobLayers, startJob, tinyJob, uniqueJob, waitUntil } from "./support/control-job.ts"
import { acquireNats, type AcquiredNats } from "./support/nats.ts"

let nats: AcquiredNats
beforeAll(async () => {
  nats = await acquireNats({ jetstream: true })
})
afterAll(async () => {
  await nats?.stop()
})

const SENDER = "ctl-test"
const checkpoints = (dir: string) => (existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith(".ckpt")).sort() : [])

/** Send a control request and insist it was accepted. */
const command = (bus: BusShape, job: string, verb: ControlVerb, fields: Record<string, unknown> = {}) =>
  Effect.gen(function* () {
    const r: ControlReply = yield* requestControl(bus, job, verb, fields, { sender: SENDER })
    if (r._tag !== "ControlAccepted") throw new Error(`${verb} was not accepted: ${JSON.stringify(r)}`)
    return r
  })

const lrOf = (bus: BusShape, job: string, step: number) =>
  bus.request(subjects(job).lr, encodeMessage({ _tag: "GetLr", v: PROTOCOL_VERSION, step }), { timeoutMs: 2_000 }).pipe(
    Effect.flatMap((m) => Effect.fromResult(decodeBytes(LrForStep, m.subject, m.data))),
    Effect.map((r) => r.lr)
  )

describe("control plane over NATS", () => {
  it.live("a live set-lr changes the LR of the next steps, and exactly from fromStep", () =>
    Effect.gen(function* () {
      const bus = yield* Bus
      const job = tinyJob(uniqueJob("ctl-lr"))
      const run = yield* startJob(job, { nats: [nats.url] })
      yield* waitUntil("3 steps", () => run.version() >= 3)
      expect(run.applied.every((a) => a.lr === 1e-3)).toBe(true)

      // no fromStep: the next steps
      yield* command(bus, job.job, "set-lr", { lr: 2.5e-4 })
      const atAccept = run.version()
      yield* waitUntil("5 more steps", () => run.version() >= atAccept + 5)
      const firstNew = run.applied.findIndex((a) => a.lr === 2.5e-4)
      expect(firstNew).toBeGreaterThan(0)
      // the LR is asked for when a step is applied: at most the step in flight keeps the old one
      expect(run.applied[firstNew].version).toBeLessThanOrEqual(atAccept + 2)
      expect(run.applied.slice(firstNew).every((a) => a.lr === 2.5e-4)).toBe(true)
      expect(run.applied.slice(0, firstNew).every((a) => a.lr === 1e-3)).toBe(true)

      // fromStep: exactly from that step (StepApplied.version v used the LR of step v - 1)
      const from = run.version() + 8
      yield* command(bus, job.job, "set-lr", { lr: 7e-4, fromStep: from })
      yield* waitUntil(`step ${from + 3}`, () => run.version() >= from + 3)
      for (const a of run.applied.slice(firstNew)) {
        expect(a.lr, `version ${a.version}`).toBe(a.version - 1 >= from ? 7e-4 : 2.5e-4)
      }
      expect(run.ps.state.params.values().next().value!.every(Number.isFinite)).toBe(true)
    }).pipe(Effect.scoped, Effect.provide(jobLayers(nats.url))), 60_000)

  it.live("pause stops the version from advancing, resume continues it; status shows the topology", () =>
    Effect.gen(function* () {
      const bus = yield* Bus
      const job = tinyJob(uniqueJob("ctl-pause"))
      const run = yield* startJob(job, { nats: [nats.url] })
      yield* waitUntil("3 steps", () => run.version() >= 3)

      yield* command(bus, job.job, "pause")
      yield* waitUntil("the server to pause", () => run.ps.state.version === run.version() && run.events.some((e) => e.verb === "pause"))
      yield* Effect.sleep(300) // a step in flight when the pause arrived may still land
      const held = run.ps.state.version
      yield* Effect.sleep(1_500)
      expect(run.ps.state.version).toBe(held)
      expect(run.version()).toBe(held)

      const st = yield* requestControl(bus, job.job, "status", {}, { sender: SENDER })
      if (st._tag !== "JobStatus") throw new Error(`status: ${JSON.stringify(st)}`)
      expect(st.paused).toBe(true)
      expect(st.version).toBe(held)
      expect(st.lr).toBe(1e-3)
      expect(st.consistency).toEqual({ mode: "sync" })
      expect(st.actors.map((a) => a.role).sort()).toEqual(["loader", "ps", "scheduler", "worker"])
      expect(st.actors.find((a) => a.role === "ps")!.state).toBe("paused")
      expect(st.actors.find((a) => a.role === "loader")!.state).toBe("paused")
      for (const a of st.actors) expect(a.heartbeatAgeMs).toBeLessThan(job.train.livenessMs)
      const text = formatStatus(st)
      expect(text).toContain("worker-0")
      expect(text).toMatch(/state\s+paused/)
      // a classifier's status adds its validation metrics and epochs
      const cls = formatStatus({ ...st, valMetrics: { loss: 0.2, accuracy: 0.96, precision: 0.9, recall: 0.8, f1: 0.85 }, epoch: { done: 7, of: 50 } })
      expect(cls).toMatch(/validation\s+accuracy 0\.9600\s+precision 0\.9000\s+recall 0\.8000\s+f1 0\.8500/)
      expect(cls).toMatch(/epoch\s+7 of 50 complete/)

      yield* command(bus, job.job, "resume")
      yield* waitUntil("the version to advance after resume", () => run.version() >= held + 3)
      const after = yield* requestControl(bus, job.job, "status", {}, { sender: SENDER })
      expect(after._tag === "JobStatus" && after.paused).toBe(false)
    }).pipe(Effect.scoped, Effect.provide(jobLayers(nats.url))), 60_000)

  it.live("reduce-on-plateau lowers the LR when validation loss stalls", () =>
    Effect.gen(function* () {
      const bus = yield* Bus
      const job = tinyJob(uniqueJob("ctl-plateau"), { schedule: { kind: "plateau", lr: 1e-3, patience: 1, factor: 0.5 } })
      const run = yield* startJob(job, { nats: [nats.url] })
      const s = subjects(job.job)
      yield* waitUntil("3 steps", () => run.version() >= 3)
      const val = (loss: number) =>
        bus.publish(s.metrics("evaluator"), encodeMessage({ _tag: "ValidationLoss", v: PROTOCOL_VERSION, evaluator: "eval-test", version: run.version(), loss, batches: 1 } satisfies ValidationLoss))

      // improving, then one bad observation (= patience): no reduction yet
      for (const loss of [3.0, 2.9, 2.95]) yield* val(loss)
      yield* bus.flush()
      yield* Effect.sleep(200)
      expect(yield* lrOf(bus, job.job, run.version())).toBe(1e-3)
      // a second bad one (> patience): lr × 0.5
      yield* val(2.95)
      yield* bus.flush()
      yield* waitUntil("the scheduler to reduce the LR", () => run.applied.some((a) => a.lr === 5e-4), 10_000)
      const at = run.version()
      yield* waitUntil("3 more steps", () => run.version() >= at + 3)
      const lrs = run.applied.map((a) => a.lr)
      expect(lrs[0]).toBe(1e-3)
      expect(lrs.at(-1)).toBe(5e-4)
      for (let i = 1; i < lrs.length; i++) expect(lrs[i]).toBeLessThanOrEqual(lrs[i - 1]) // only ever lowered
      // and once more after patience + 1 more stalls
      for (const loss of [2.95, 2.95]) yield* val(loss)
      yield* waitUntil("a second reduction", () => run.applied.some((a) => a.lr === 2.5e-4), 10_000)
    }).pipe(Effect.scoped, Effect.provide(jobLayers(nats.url))), 60_000)

  it.live("set-optimizer, set-consistency, set-schedule and checkpoint reach the servers and the scheduler", () =>
    Effect.gen(function* () {
      const bus = yield* Bus
      const job = tinyJob(uniqueJob("ctl-set"))
      const run = yield* startJob(job, { nats: [nats.url] })
      yield* waitUntil("3 steps", () => run.version() >= 3)
      const slotsBefore = run.ps.state.slots

      yield* command(bus, job.job, "set-optimizer", { patch: { beta2: 0.95, weightDecay: 0.1 } })
      yield* waitUntil("the new optimizer", () => (run.ps.state.optimizer.config as { beta2: number }).beta2 === 0.95)
      expect(run.ps.state.optimizer.config).toEqual({ kind: "adamw", beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, amsgrad: false })
      expect(run.ps.state.slots).toBe(slotsBefore) // the state is kept
      expect(run.controller.view.optimizer).toEqual(run.ps.state.optimizer.config)

      yield* command(bus, job.job, "set-consistency", { mode: "bounded", staleness: 2 })
      yield* waitUntil("bounded consistency", () => run.ps.state.consistency.mode === "bounded")
      expect(run.ps.state.consistency).toEqual({ mode: "bounded", staleness: 2 })
      yield* command(bus, job.job, "set-consistency", { mode: "sync" })
      yield* waitUntil("sync again", () => run.ps.state.consistency.mode === "sync")

      const v0 = run.version()
      yield* command(bus, job.job, "set-schedule", { schedule: { kind: "exponential", lr: 2e-3, gamma: 0.99 } })
      yield* waitUntil("the new schedule", () => run.scheduler.schedule().kind === "exponential")
      yield* waitUntil("3 more steps", () => run.version() >= v0 + 4)
      const last = run.applied.at(-1)!
      expect(last.lr).toBeCloseTo(2e-3 * 0.99 ** (last.version - 1), 12)

      const dir = join(job.train.checkpointDir, job.job, "ps-0")
      expect(checkpoints(dir)).toEqual([]) // checkpointEvery 0: none until asked
      yield* command(bus, job.job, "checkpoint")
      yield* waitUntil("a checkpoint", () => checkpoints(dir).length === 1)
      expect(run.version()).toBeGreaterThan(v0) // still training
    }).pipe(Effect.scoped, Effect.provide(jobLayers(nats.url))), 60_000)

  it.live("history lists accepted commands with sender and time, in JetStream, across controllers", () =>
    Effect.gen(function* () {
      const bus = yield* Bus
      const job = tinyJob(uniqueJob("ctl-hist"))
      const run = yield* startJob(job, { nats: [nats.url] })
      expect(run.controller.history.kind).toBe("jetstream")
      yield* waitUntil("1 step", () => run.version() >= 1)
      const t0 = Date.now()
      yield* command(bus, job.job, "set-lr", { lr: 5e-4 })
      yield* command(bus, job.job, "pause")
      const rejected = yield* requestControl(bus, job.job, "set-lr", { lr: -1 }, { sender: SENDER })
      expect(rejected._tag).toBe("ControlRejected")
      yield* command(bus, job.job, "resume")
      const t1 = Date.now()

      const h = yield* requestControl(bus, job.job, "history", {}, { sender: "someone-else" })
      if (h._tag !== "ControlHistory") throw new Error(`history: ${JSON.stringify(h)}`)
      expect(h.store).toBe("jetstream")
      expect(h.entries.map((e) => e.verb)).toEqual(["set-lr", "pause", "resume"]) // the rejected one is not there
      expect(h.entries.map((e) => e.seq)).toEqual([1, 2, 3])
      for (const e of h.entries) {
        expect(e.sender).toBe(SENDER)
        expect(e.at).toBeGreaterThanOrEqual(t0)
        expect(e.at).toBeLessThanOrEqual(t1)
        expect(e.by).toBe("scheduler-0-controller")
      }
      expect(h.entries[0].command).toMatchObject({ _tag: "SetLr", lr: 5e-4, sender: SENDER })
      expect(run.events.map((e) => e.seq)).toEqual([1, 2, 3]) // what was broadcast is what was recorded
      expect(formatHistory(h)).toContain(SENDER)

      // a second controller on the same job reads the same stream (as a restarted one would)
      const second = yield* runController({ job, id: "scheduler-1-controller", nats: [nats.url] })
      const again = yield* second.history.list(10)
      expect(again.map((e) => [e.seq, e.verb, e.sender, e.at])).toEqual(h.entries.map((e) => [e.seq, e.verb, e.sender, e.at]))
      const limited = yield* requestControl(bus, job.job, "history", { limit: 2 }, { sender: SENDER })
      expect(limited._tag === "ControlHistory" && limited.entries.map((e) => e.verb)).toEqual(["pause", "resume"])
    }).pipe(Effect.scoped, Effect.provide(jobLayers(nats.url))), 60_000)

  it.live("stop: servers checkpoint, workers finish, loaders stop leasing", () =>
    Effect.gen(function* () {
      const bus = yield* Bus
      const job = tinyJob(uniqueJob("ctl-stop"))
      const run = yield* startJob(job, { nats: [nats.url], evaluator: false })
      yield* waitUntil("3 steps", () => run.version() >= 3)
      yield* command(bus, job.job, "stop")
      yield* Deferred.await(run.workers[0].finished).pipe(Effect.timeout(10_000))
      const dir = join(job.train.checkpointDir, job.job, "ps-0")
      yield* waitUntil("the stop checkpoint", () => checkpoints(dir).length > 0, 10_000)
      yield* Effect.sleep(500)
      const v = run.ps.state.version
      const ckpt = checkpoints(dir).at(-1)!
      expect(ckpt).toBe(`v${String(v).padStart(8, "0")}.ckpt`)
      yield* Effect.sleep(500)
      expect(run.ps.state.version).toBe(v) // nothing applied after the stop
      const st = yield* requestControl(bus, job.job, "status", {}, { sender: SENDER })
      expect(st._tag === "JobStatus" && st.stopped).toBe(true)
      const resumed = yield* requestControl(bus, job.job, "resume", {}, { sender: SENDER })
      expect(resumed._tag === "ControlRejected" && resumed.code).toBe("conflict")
    }).pipe(Effect.scoped, Effect.provide(jobLayers(nats.url))), 60_000)
})
