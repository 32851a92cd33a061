// Implements: 200 generated bad control messages against a training job over a real NATS
// server — bad JSON, non-UTF-8, empty and oversize payloads, wrong types, NaN/Infinity,
// negative LR, unknown verbs, wrong job, unknown fields, invalid optimizer patches,
// schedules and consistency modes, wrong tags and protocol versions. Each one gets a
// ControlRejected reply with a reason (and the expected code), each one is published on
// the job's `errors` subject, none is broadcast or recorded, and the job keeps training
// (versions advance during the barrage). The run's final parameters are bit-identical to
// a reference run of the same job that got no control messages at all (sync, one
// worker: a deterministic run), so the messages changed nothing.
// Run: npx vitest run test/control.bad-messages.test.ts
// Does not own: accepted commands (test/control.test.ts).
import { afterAll, beforeAll, describe, expect, it } from "@effect/vitest"
import { Deferred, Effect, Result } from "effect"
import { Bus } from "../shared/bus/Bus.ts"
import type { JobConfig } from "../shared/config/job.ts"
import { CONTROL_MAX_BYTES, ControlReply } from "../shared/protocol/control.ts"
import { decodeBytes } from "../shared/protocol/decode.ts"
import type { ErrorCode } from "../shared/protocol/messages.ts"
import { PROTOCOL_VERSION, subjects } from "../shared/protocol/subjects.ts"
import { jobLayers, startJob, tinyJob, uniqueJob, waitUntil } from "./support/control-job.ts"
import { acquireNats, type AcquiredNats } from "./support/nats.ts"

let nats: AcquiredNats
beforeAll(async () => {
  nats = await acquireNats({ jetstream: true })
})
afterAll(async () => {
  await nats?.stop()
})

const STEPS = 220
const te = new TextEncoder()

interface Bad {
  readonly what: string
  /** the verb token of the subject (`control.<verb>`). */
  readonly verb: string
  readonly data: Uint8Array
  readonly codes: readonly ErrorCode[]
  /** the requestId the reply must echo, when the message carried a readable one. */
  readonly requestId?: string
}

/** 200 bad messages for job `job`, cycling through the kinds with varied values. */
const badMessages = (job: string): Bad[] => {
  const base = (verb: string, tag: string, i: number, extra: Record<string, unknown> = {}) => ({
    _tag: tag, v: PROTOCOL_VERSION, job, sender: "fuzzer", requestId: `bad-${i}`, ...extra
  })
  const json = (what: string, verb: string, body: unknown, codes: ErrorCode[], requestId?: string): Bad => ({ what, verb, data: te.encode(JSON.stringify(body)), codes, requestId })
  const raw = (what: string, verb: string, text: string | Uint8Array, codes: ErrorCode[]): Bad => ({ what, verb, data: typeof text === "string" ? te.encode(text) : text, codes })
  const V: ErrorCode[] = ["invalid-value"]
  const B: ErrorCode[] = ["bad-message"]
  const kinds: Array<(i: number) => Bad> = [
    // not JSON / not an object
    (i) => raw("truncated JSON", "set-lr", `{"_tag":"SetLr","lr":${i}`, B),
    (i) => raw("JSON5-ish", "set-lr", `{_tag: 'SetLr', lr: ${i}}`, B),
    () => raw("NaN literal", "set-lr", `{"_tag":"SetLr","v":1,"job":"${job}","sender":"fuzzer","requestId":"x","lr":NaN}`, B),
    () => raw("empty payload", "pause", "", B),
    (i) => raw("not UTF-8", "pause", Uint8Array.of(0xff, 0xfe, 0x80 + (i % 64), 0x00), B),
    (i) => raw("a JSON number", "resume", String(i), B),
    () => raw("a JSON array", "stop", `[{"_tag":"StopJob"}]`, B),
    () => raw("JSON null", "checkpoint", "null", B),
    (i) => raw("a JSON string", "status", JSON.stringify(`status ${i}`), B),
    // wrong types and missing fields
    (i) => json("lr as a string", "set-lr", base("set-lr", "SetLr", i, { lr: "fast" }), B, `bad-${i}`),
    (i) => json("lr NaN as string", "set-lr", base("set-lr", "SetLr", i, { lr: "NaN" }), B, `bad-${i}`),
    (i) => json("lr null (JSON's NaN)", "set-lr", base("set-lr", "SetLr", i, { lr: null }), B, `bad-${i}`),
    (i) => json("lr missing", "set-lr", base("set-lr", "SetLr", i), B, `bad-${i}`),
    (i) => json("job as a number", "pause", { ...base("pause", "PauseJob", i), job: 42 }, B, `bad-${i}`),
    (i) => json("sender missing", "resume", { _tag: "ResumeJob", v: PROTOCOL_VERSION, job, requestId: `bad-${i}` }, B, `bad-${i}`),
    (i) => json("sender with a dot", "pause", { ...base("pause", "PauseJob", i), sender: "a.b" }, B, `bad-${i}`),
    (i) => json("sender wildcard", "pause", { ...base("pause", "PauseJob", i), sender: ">" }, B, `bad-${i}`),
    (i) => json("sender too long", "pause", { ...base("pause", "PauseJob", i), sender: "s".repeat(65) }, B, `bad-${i}`),
    () => json("requestId empty", "stop", { ...base("stop", "StopJob", 0), requestId: "" }, B),
    () => json("requestId too long", "stop", { ...base("stop", "StopJob", 0), requestId: "r".repeat(200) }, B),
    (i) => json("protocol version 2", "stop", { ...base("stop", "StopJob", i), v: 2 }, B, `bad-${i}`),
    (i) => json("protocol version as string", "checkpoint", { ...base("checkpoint", "CheckpointJob", i), v: "1" }, B, `bad-${i}`),
    (i) => json("tag of another verb", "pause", base("pause", "ResumeJob", i), B, `bad-${i}`),
    (i) => json("tag missing", "stop", { v: PROTOCOL_VERSION, job, sender: "fuzzer", requestId: `bad-${i}` }, B, `bad-${i}`),
    (i) => json("unknown field", "pause", base("pause", "PauseJob", i, { force: true }), B, `bad-${i}`),
    (i) => json("status with a field", "status", base("status", "GetJobStatus", i, { verbose: 1 }), B, `bad-${i}`),
    (i) => json("history limit 0", "history", base("history", "GetControlHistory", i, { limit: 0 }), B, `bad-${i}`),
    (i) => json("history limit negative", "history", base("history", "GetControlHistory", i, { limit: -1 - i }), B, `bad-${i}`),
    // bad values
    (i) => json("negative lr", "set-lr", base("set-lr", "SetLr", i, { lr: -(i + 1) * 1e-4 }), V, `bad-${i}`),
    (i) => json("tiny negative lr", "set-lr", base("set-lr", "SetLr", i, { lr: -1e-300 }), V, `bad-${i}`),
    () => raw("lr Infinity (1e999)", "set-lr", `{"_tag":"SetLr","v":1,"job":"${job}","sender":"fuzzer","requestId":"inf","lr":1e999}`, V),
    () => raw("lr -Infinity", "set-lr", `{"_tag":"SetLr","v":1,"job":"${job}","sender":"fuzzer","requestId":"ninf","lr":-1e999}`, V),
    (i) => json("fromStep negative", "set-lr", base("set-lr", "SetLr", i, { lr: 1e-3, fromStep: -1 }), B, `bad-${i}`),
    (i) => json("fromStep fractional", "set-lr", base("set-lr", "SetLr", i, { lr: 1e-3, fromStep: 1.5 }), B, `bad-${i}`),
    (i) => json("optimizer beta2 >= 1", "set-optimizer", base("set-optimizer", "SetOptimizer", i, { patch: { beta2: 1 + i / 100 } }), V, `bad-${i}`),
    (i) => json("optimizer eps 0", "set-optimizer", base("set-optimizer", "SetOptimizer", i, { patch: { eps: 0 } }), V, `bad-${i}`),
    (i) => json("optimizer field of another kind", "set-optimizer", base("set-optimizer", "SetOptimizer", i, { patch: { momentum: 0.9 } }), V, `bad-${i}`),
    (i) => json("optimizer kind change", "set-optimizer", base("set-optimizer", "SetOptimizer", i, { patch: { kind: true } }), V, `bad-${i}`),
    (i) => json("optimizer amsgrad (state layout)", "set-optimizer", base("set-optimizer", "SetOptimizer", i, { patch: { amsgrad: true } }), V, `bad-${i}`),
    (i) => json("optimizer weightDecay negative", "set-optimizer", base("set-optimizer", "SetOptimizer", i, { patch: { weightDecay: -0.1 } }), V, `bad-${i}`),
    (i) => json("optimizer value a string", "set-optimizer", base("set-optimizer", "SetOptimizer", i, { patch: { beta1: "high" } }), B, `bad-${i}`),
    (i) => json("optimizer patch empty", "set-optimizer", base("set-optimizer", "SetOptimizer", i, { patch: {} }), V, `bad-${i}`),
    (i) => json("optimizer patch an array", "set-optimizer", base("set-optimizer", "SetOptimizer", i, { patch: [0.9] }), B, `bad-${i}`),
    (i) => json("schedule kind unknown", "set-schedule", base("set-schedule", "SetSchedule", i, { schedule: { kind: "warp", lr: 1 } }), V, `bad-${i}`),
    (i) => json("schedule negative lr", "set-schedule", base("set-schedule", "SetSchedule", i, { schedule: { kind: "constant", lr: -1 } }), V, `bad-${i}`),
    (i) => json("schedule totalSteps <= warmup", "set-schedule", base("set-schedule", "SetSchedule", i, { schedule: { kind: "cosine", lr: 1e-3, warmupSteps: 10, totalSteps: 5 } }), V, `bad-${i}`),
    (i) => json("schedule minLr > lr", "set-schedule", base("set-schedule", "SetSchedule", i, { schedule: { kind: "cosine", lr: 1e-3, totalSteps: 100, minLr: 1 } }), V, `bad-${i}`),
    (i) => json("schedule unknown field", "set-schedule", base("set-schedule", "SetSchedule", i, { schedule: { kind: "constant", lr: 1e-3, turbo: true } }), V, `bad-${i}`),
    (i) => json("plateau factor 2", "set-schedule", base("set-schedule", "SetSchedule", i, { schedule: { kind: "plateau", lr: 1e-3, factor: 2 } }), V, `bad-${i}`),
    (i) => json("schedule not an object", "set-schedule", base("set-schedule", "SetSchedule", i, { schedule: "cosine" }), B, `bad-${i}`),
    (i) => json("consistency mode unknown", "set-consistency", base("set-consistency", "SetConsistency", i, { mode: "eventual" }), B, `bad-${i}`),
    (i) => json("bounded without staleness", "set-consistency", base("set-consistency", "SetConsistency", i, { mode: "bounded" }), V, `bad-${i}`),
    (i) => json("staleness negative", "set-consistency", base("set-consistency", "SetConsistency", i, { mode: "bounded", staleness: -2 }), B, `bad-${i}`),
    (i) => json("staleness fractional", "set-consistency", base("set-consistency", "SetConsistency", i, { mode: "bounded", staleness: 0.5 }), B, `bad-${i}`),
    (i) => json("staleness for sync", "set-consistency", base("set-consistency", "SetConsistency", i, { mode: "sync", staleness: 3 }), V, `bad-${i}`),
    // wrong job, unknown verbs, oversize
    (i) => json("wrong job", "set-lr", { ...base("set-lr", "SetLr", i, { lr: 1e-4 }), job: "someone-elses-job" }, ["wrong-job"], `bad-${i}`),
    (i) => json("wrong job (pause)", "pause", { ...base("pause", "PauseJob", i), job: `${job}x` }, ["wrong-job"], `bad-${i}`),
    (i) => json("unknown verb", "frobnicate", base("frobnicate", "Frobnicate", i), ["unknown-verb"]),
    (i) => json("verb in capitals", "SET-LR", base("set-lr", "SetLr", i, { lr: 1e-4 }), ["unknown-verb"]),
    (i) => json("verb misspelt", "setlr", base("set-lr", "SetLr", i, { lr: 1e-4 }), ["unknown-verb"]),
    (i) => json("oversize", "set-lr", base("set-lr", "SetLr", i, { lr: 1e-4, pad: "x".repeat(CONTROL_MAX_BYTES + i) }), B)
  ]
  return Array.from({ length: 200 }, (_, i) => kinds[i % kinds.length](i))
}

/** Train `job` to its last step; during it, optionally send `bad` and check each reply. */
const train = (job: JobConfig, bad: Bad[] | undefined) =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const run = yield* startJob(job, { nats: [nats.url] })
    const s = subjects(job.job)
    let during: { from: number; to: number } | undefined
    if (bad) {
      yield* waitUntil("5 steps", () => run.version() >= 5)
      const from = run.version()
      for (const b of bad) {
        const m = yield* bus.request(`${s.prefix}.control.${b.verb}`, b.data, { timeoutMs: 5_000 }).pipe(
          Effect.mapError((e) => new Error(`${b.what}: no reply (${e._tag})`))
        )
        const r = decodeBytes(ControlReply, m.subject, m.data)
        if (Result.isFailure(r)) throw new Error(`${b.what}: the reply does not decode: ${r.failure.reason}`)
        const reply = r.success
        expect(reply._tag, b.what).toBe("ControlRejected")
        if (reply._tag !== "ControlRejected") continue
        expect(b.codes, `${b.what}: ${reply.code} ${reply.reason}`).toContain(reply.code)
        expect(reply.reason.length, b.what).toBeGreaterThan(10)
        if (b.requestId) expect(reply.requestId, b.what).toBe(b.requestId)
      }
      during = { from, to: run.version() }
    }
    yield* Deferred.await(run.ps.finished).pipe(Effect.timeout(60_000))
    const lrs = new Set(run.applied.map((a) => a.lr))
    return {
      during,
      params: new Map([...run.ps.state.params].map(([k, v]) => [k, Float32Array.from(v)])),
      version: run.ps.state.version,
      optimizer: run.ps.state.optimizer.config,
      consistency: run.ps.state.consistency,
      events: run.events.length,
      controllerErrors: run.errors.filter((e) => e.by === "scheduler-0-controller"),
      history: yield* run.controller.history.list(1_000),
      lrs: [...lrs]
    }
  })

describe("bad control messages over NATS", () => {
  it.live("200 bad messages are each rejected with a reason, change nothing, and training goes on", () =>
    Effect.gen(function* () {
      const patch = { train: { steps: STEPS }, schedule: { kind: "constant", lr: 1e-3 } }
      const reference = yield* train(tinyJob(uniqueJob("bad-ref"), patch), undefined).pipe(Effect.scoped)
      const job = tinyJob(uniqueJob("bad-msgs"), patch)
      const bad = badMessages(job.job)
      expect(bad).toHaveLength(200)
      const attacked = yield* train(job, bad).pipe(Effect.scoped)

      // each got a reply (checked as sent) and an errors message naming the problem
      expect(attacked.controllerErrors).toHaveLength(200)
      for (const e of attacked.controllerErrors) {
        expect(e.subject.startsWith(`flotilla.${job.job}.control.`)).toBe(true)
        expect(e.reason.length).toBeGreaterThan(10)
      }
      // nothing was accepted, broadcast or recorded
      expect(attacked.events).toBe(0)
      expect(attacked.history).toEqual([])
      // the job kept training through the barrage and to the end
      expect(attacked.during!.to).toBeGreaterThan(attacked.during!.from)
      expect(attacked.during!.to).toBeLessThan(STEPS)
      expect(attacked.version).toBe(STEPS)
      // LR, optimizer and consistency as configured
      expect(attacked.lrs).toEqual([1e-3])
      expect(attacked.optimizer).toEqual(reference.optimizer)
      expect(attacked.consistency).toEqual({ mode: "sync" })
      // parameters finite and bit-identical to the run that got no control messages
      expect(reference.version).toBe(STEPS)
      expect([...attacked.params.keys()]).toEqual([...reference.params.keys()])
      for (const [name, p] of attacked.params) {
        expect(p.every(Number.isFinite), name).toBe(true)
        expect(Buffer.from(p.buffer).equals(Buffer.from(reference.params.get(name)!.buffer)), name).toBe(true)
      }
    }).pipe(Effect.provide(jobLayers(nats.url, "Error"))), 90_000)
})
