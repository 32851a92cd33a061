// Checks: receivers trust nothing (pure parts; test/fuzz.test.ts sends the same kinds of
// input to a live job). A params bundle is checked before anyone looks at its numbers
// (shared/protocol/params-check.ts: job, kind, shard, names, shapes, dtypes, finite, version
// ≤ steps, no future incarnation); a broadcast is believed only within what its server
// said (actors/worker/params-cache.ts: the confirmed server id, MAX_AHEAD, no going back,
// an unconfirmed incarnation is pulled), a pull reply corrects a cache its server never
// confirmed, and one forged broadcast of the last version no longer ends a worker — it
// finishes only once the server confirms. A control event acts only when a controller
// could have issued it (shared/protocol/control-check.ts, shared/actor/control-listener.ts
// orderProblem); LRs are bounded by MAX_LR everywhere (set-lr, schedules, LR replies,
// decisions, the scheduler's own LR); metadata numbers are bounded (limits.ts).
import { describe, expect, it } from "vitest"
import { Result } from "effect"
import { initialWorker, step, type WorkerEffect, type WorkerEvent } from "../actors/worker/core.ts"
import { MAX_AHEAD } from "../actors/worker/params-cache.ts"
import { validateCommand, type ControlView } from "../actors/controller/controller.ts"
import { MAX_SEQ_AHEAD, orderProblem } from "../shared/actor/control-listener.ts"
import { resolveJob } from "../shared/config/job.ts"
import { shardOfForJob } from "../shared/models/pipeline.ts"
import { makeModel } from "../shared/models/zoo.ts"
import { resolveOptimizer } from "../shared/optim/optimizers.ts"
import type { ControlApplied, ControlCommand } from "../shared/protocol/control.ts"
import { commandProblem, eventProblem } from "../shared/protocol/control-check.ts"
import { decodeValue } from "../shared/protocol/decode.ts"
import { gradMetaProblem, MAX_LR } from "../shared/protocol/limits.ts"
import { GradMeta, LrForStep, StepDecided, ValidationLoss } from "../shared/protocol/messages.ts"
import { checkParams, paramsExpectation } from "../shared/protocol/params-check.ts"
import { resolveSchedule } from "../shared/schedule/schedules.ts"
import { initialState, lrFrom, parseState } from "../shared/schedule/state.ts"
import { encodeTensor } from "../shared/wire/codecs.ts"
import { specOf } from "../shared/wire/compression.ts"
import type { TensorBundle } from "../shared/wire/tensor.ts"

const job = resolveJob({ job: "rx", model: { kind: "gpt", vocabSize: 256, contextLength: 8, layers: 1, heads: 1, width: 8 }, data: { batchSize: 4 }, train: { steps: 50 }, topology: { workers: 2, psShards: 2 } }, "test")
const model = makeModel(job.model)
const shardOf = shardOfForJob(job, model)
const expectAll = paramsExpectation(job, model.specs, shardOf)
const NOW = 1_700_000_000_000
const specsOf = (k: number) => model.specs.filter((s) => shardOf.get(s.name) === k)
const bundle = (k: number, o: { version?: number; job?: string; kind?: string; extra?: Record<string, unknown>; edit?: (t: TensorBundle["tensors"]) => TensorBundle["tensors"] } = {}): TensorBundle => {
  const tensors = specsOf(k).map((s) => ({ name: s.name, dtype: "float32" as const, shape: s.shape, data: new Float32Array(s.shape.reduce((a, b) => a * b, 1)).fill(0.5) }))
  return {
    tensors: o.edit ? o.edit(tensors) : tensors,
    meta: { kind: o.kind ?? "params", job: o.job ?? "rx", version: o.version ?? 3, step: 3, sender: `ps-${k}`, codec: "f32", extra: (o.extra ?? { shard: k, incarnation: NOW - 1000 }) as never }
  }
}
const problem = (b: TensorBundle, shard?: number, x = expectAll) => {
  const r = checkParams(b, x, NOW, shard)
  return r.ok ? "ok" : `${r.code}: ${r.reason}`
}

describe("params bundles are checked before their numbers are used", () => {
  it("accepts a shard's own bundle, and refuses every way it can be wrong, saying why", () => {
    expect(problem(bundle(0), 0)).toBe("ok")
    expect(problem(bundle(1), 1)).toBe("ok")
    expect(problem(bundle(0, { kind: "grads" }))).toMatch(/^bad-message: expected a params bundle/)
    expect(problem(bundle(0, { job: "other" }))).toMatch(/^wrong-job/)
    expect(problem(bundle(0, { extra: { shard: "zero", incarnation: 1 } }))).toMatch(/^bad-message/)
    expect(problem(bundle(0), 1)).toMatch(/^bad-message: params of shard 0 on shard 1's subject/)
    expect(problem(bundle(0, { extra: { shard: 7, incarnation: 1 } }))).toMatch(/not a shard this actor reads/)
    expect(problem(bundle(0, { version: 51 }))).toMatch(/^invalid-value: params version 51 is outside \[0, 50\]/)
    expect(problem(bundle(0, { version: -1 }))).toMatch(/^invalid-value/)
    expect(problem(bundle(0, { extra: { shard: 0, incarnation: NOW + 86_400_000 } }))).toMatch(/incarnation .* in the future/)
    expect(problem(bundle(0, { edit: (t) => t.slice(1) }))).toMatch(/^bad-tensor: params of shard 0: missing /)
    expect(problem(bundle(0, { edit: (t) => [...t, { name: "extra.w", dtype: "float32", shape: [1], data: new Float32Array(1) }] }))).toMatch(/not the shard's: extra.w/)
    expect(problem(bundle(0, { edit: (t) => t.map((x, i) => (i === 0 ? { ...x, shape: [x.data.length] } : x)) }))).toMatch(/^bad-tensor: params .* has shape/)
    expect(problem(bundle(0, { edit: (t) => t.map((x, i) => (i === 0 ? { ...x, dtype: "int32", data: new Int32Array(x.data.length) } : x)) }))).toMatch(/is int32; this job's params travel float32$/)
    expect(problem(bundle(0, { edit: (t) => t.map((x, i) => (i === 0 ? { ...x, data: Float32Array.from(x.data as Float32Array, (v, j) => (j === 3 ? Number.NaN : v)) } : x)) }))).toMatch(/^non-finite: params .*\[3\] is NaN/)
    // bf16 only when the job broadcasts bf16 params; its Infinity widens and is caught
    const bf = (v: number) => bundle(0, { edit: (t) => t.map((x, i) => (i === 0 ? encodeTensor(specOf("bf16"), x.name, x.shape, new Float32Array(x.data.length).fill(v)) : x)) })
    expect(problem(bf(1))).toMatch(/is bf16/)
    expect(problem(bf(1), undefined, { ...expectAll, bf16: true })).toBe("ok")
    expect(problem(bf(Number.POSITIVE_INFINITY), undefined, { ...expectAll, bf16: true })).toMatch(/^non-finite: .* is Infinity/)
  })
})

describe("which broadcasts a worker believes, and when it finishes", () => {
  const cfg = { id: "w0", shards: 2, steps: 50, accumulate: 1, ackTimeoutMs: 1_000, watchdogMs: 2_000 }
  const params = (shard: number, version: number, o: Partial<Extract<WorkerEvent, { _tag: "ParamsReceived" }>> = {}): WorkerEvent =>
    ({ _tag: "ParamsReceived", shard, incarnation: 7, version, params: new Map(), source: "broadcast", sender: `ps-${shard}`, ...o })
  const seen = (shard: number, version: number, incarnation = 7): WorkerEvent => ({ _tag: "ServerSeen", shard, incarnation, version, id: `ps-${shard}` })
  const tags = (fx: WorkerEffect[]) => fx.map((e) => e._tag)
  const joined = (version: number) => {
    const s = initialWorker(cfg, "sync", 0)
    for (const k of [0, 1]) step(s, params(k, version, { source: "pull" }))
    return s
  }

  it("a forged broadcast of the last version does not end the worker; the server's confirmation does", () => {
    const s = joined(45)
    expect(tags(step(s, params(0, 50)))).toEqual(["Pull"]) // a jump nobody confirmed: kept as a claim, the shard is pulled
    expect(tags(step(s, params(1, 50)))).toEqual(["Pull"])
    expect([s.cache.get(0)!.version, s.cache.get(1)!.version]).toEqual([45, 45])
    // the servers say 45: the claims are refused, naming whoever sent them
    const fx0 = step(s, params(0, 45, { source: "pull" }))
    expect(fx0.find((x) => x._tag === "RefuseParams")).toMatchObject({ version: 50, sender: "ps-0", reason: expect.stringMatching(/at version 50 .* are not its server's: its pull reply says version 45/) })
    step(s, params(1, 45, { source: "pull" }))
    // the real versions, one by one: the last is cached, but it ends the worker only once its servers confirm it
    for (let v = 46; v <= 50; v++) for (const k of [0, 1]) step(s, params(k, v))
    expect(s.finished).toBe(false)
    step(s, seen(0, 50))
    expect(tags(step(s, seen(1, 50)))).toContain("Finish")
    expect(s.finished).toBe(true)
  })

  it("refuses a broadcast far past or behind what its server said, or from another sender; a pull reply judges the rest", () => {
    const s = joined(10)
    const refused = (e: WorkerEvent) => step(s, e).filter((x) => x._tag === "RefuseParams") as Extract<WorkerEffect, { _tag: "RefuseParams" }>[]
    expect(refused(params(0, 10 + MAX_AHEAD + 1))[0]?.reason).toMatch(new RegExp(`${MAX_AHEAD + 1} past what its server last said \\(version 10\\)`))
    expect(refused(params(0, 11, { sender: "impostor" }))[0]?.reason).toMatch(/from impostor, but its server .* is ps-0/)
    expect(refused(params(0, 5))[0]?.reason).toMatch(/behind version 10 its server last said/)
    expect(tags(step(s, params(0, 3, { incarnation: 99, messageId: "x-1" })))).toEqual(["Pull"]) // a new incarnation nobody confirmed: a claim
    expect(refused(params(0, 40, { messageId: "x-2" }))).toEqual([]) // a jump: a claim too
    // the next versions are believed before any heartbeat says so
    step(s, params(0, 11))
    step(s, params(0, 12))
    expect(s.cache.get(0)!.version).toBe(12)
    // the reply: the server is at 10 — both claims and the cached 11, 12 it never reached are refused
    const out = refused(params(0, 10, { source: "pull" }))
    expect(out.map((r) => [r.version, r.messageId ?? r.sender])).toEqual([[3, "x-1"], [40, "x-2"], [12, "ps-0"]])
    expect(s.cache.get(0)!.version).toBe(10)
    // a heartbeat confirms a version: a broadcast up to it is believed at once
    step(s, seen(0, 30))
    expect(refused(params(0, 30))).toEqual([])
    expect(s.cache.get(0)!.version).toBe(30)
  })
})

describe("control events act only when a controller could have issued them", () => {
  const ev = (command: Record<string, unknown>, o: Partial<ControlApplied> = {}): ControlApplied => ({
    _tag: "ControlApplied", v: 1, job: "rx", seq: 5, verb: "set-lr", command: { _tag: "SetLr", v: 1, job: "rx", sender: "ctl", requestId: "r1", ...command } as never,
    sender: "ctl", requestId: "r1", by: "scheduler-0-controller", at: 0, epoch: 7, ...o
  })
  it("checks who claims it, what it carries, and its numbers", () => {
    expect(eventProblem(ev({ lr: 1e-3 }), "rx")).toBeUndefined()
    expect(eventProblem(ev({ lr: 1e-3 }, { by: "mallory" }), "rx")?.reason).toMatch(/not a controller id/)
    expect(eventProblem(ev({ _tag: "PauseJob" }), "rx")?.reason).toMatch(/a set-lr carrying a PauseJob/)
    expect(eventProblem(ev({ lr: 1e-3, job: "other" }), "rx")?.code).toBe("wrong-job")
    expect(eventProblem(ev({ lr: 1e-3, sender: "other" }), "rx")?.reason).toMatch(/sender\/request/)
    expect(eventProblem(ev({ lr: 1e30 }), "rx")?.reason).toMatch(/above the bound 10/)
    expect(eventProblem(ev({ lr: -1 }), "rx")?.reason).toMatch(/finite number >= 0, got -1/)
    expect(eventProblem(ev({ lr: Number.POSITIVE_INFINITY }), "rx")?.reason).toMatch(/finite/)
    const sched = (schedule: unknown) => eventProblem(ev({ _tag: "SetSchedule", schedule }, { verb: "set-schedule" }), "rx")
    expect(sched({ kind: "constant", lr: 0.01 })).toBeUndefined()
    expect(sched({ kind: "constant", lr: 50 })?.reason).toMatch(/lr/)
  })
  it("refuses a seq or epoch no controller sends", () => {
    const cursor = { epoch: 7, seq: 4, pending: new Map() }
    expect(orderProblem(cursor, ev({ lr: 1e-3 }), NOW)).toBeUndefined()
    expect(orderProblem(cursor, ev({ lr: 1e-3 }, { seq: 4 + MAX_SEQ_AHEAD + 1 }), NOW)).toMatch(/commands past the last one applied here/)
    expect(orderProblem(undefined, ev({ lr: 1e-3 }, { replayed: true, latest: 1e9 }), NOW)).toMatch(/latest/)
    expect(orderProblem(undefined, ev({ lr: 1e-3 }, { epoch: NOW + 10 * 86_400_000 }), NOW)).toMatch(/future/)
  })
  it("the controller refuses the same things (one rule)", () => {
    const view = { optimizer: Result.getOrThrow(resolveOptimizer({ kind: "sgd" } as never)), schedule: Result.getOrThrow(resolveSchedule({ kind: "constant", lr: 0.1 })), consistency: { mode: "sync" }, paused: false, stopped: false, compression: { base: job.train.compression, switches: [] } } as ControlView
    const c = (x: Record<string, unknown>) => ({ v: 1, job: "rx", sender: "ctl", requestId: "r", ...x }) as unknown as ControlCommand
    expect(Result.isFailure(validateCommand(view, c({ _tag: "SetLr", lr: 1e30 })))).toBe(true)
    expect(Result.isSuccess(validateCommand(view, c({ _tag: "SetLr", lr: MAX_LR })))).toBe(true)
    expect(commandProblem(c({ _tag: "SetOptimizer", patch: { momentum: Number.NaN } }))?.reason).toMatch(/finite/)
  })
})

describe("numbers in metadata are bounded", () => {
  const ok = (schema: Parameters<typeof decodeValue>[0], v: unknown) => Result.isSuccess(decodeValue(schema, "t", v))
  it("samples, tokens, losses, LRs", () => {
    const g = { samples: 4, tokens: 32, loss: 2, normSq: 1, micro: "e0-b0", gen: 1, epochBatches: 10, incarnation: 1 }
    expect(ok(GradMeta, g)).toBe(true)
    expect(ok(GradMeta, { ...g, samples: 2 ** 31 + 1 })).toBe(false)
    expect(ok(GradMeta, { ...g, samples: 0 })).toBe(false)
    expect(ok(GradMeta, { ...g, loss: Number.POSITIVE_INFINITY })).toBe(false)
    expect(ok(GradMeta, { ...g, normSq: Number.POSITIVE_INFINITY })).toBe(false)
    expect(ok(GradMeta, { ...g, tokens: 2 ** 60 })).toBe(false)
    expect(gradMetaProblem(job, g, 1)).toBeUndefined()
    expect(gradMetaProblem(job, { ...g, samples: 5 }, 1)).toMatch(/samples 5 > 4/)
    expect(gradMetaProblem(job, { ...g, samples: 8 }, 2)).toBeUndefined()
    expect(gradMetaProblem(job, { ...g, tokens: 33 }, 1)).toMatch(/tokens 33 > 32/)
    const lr = (v: number) => ok(LrForStep, { _tag: "LrForStep", v: 1, step: 3, lr: v, schedule: "constant" })
    expect([lr(0.1), lr(MAX_LR), lr(MAX_LR * 1.01), lr(-1)]).toEqual([true, true, false, false])
    expect(ok(StepDecided, { _tag: "StepDecided", v: 1, shard: 0, incarnation: 1, version: 3, chosen: [], lr: 1e30 })).toBe(false)
    expect(ok(ValidationLoss, { _tag: "ValidationLoss", v: 1, evaluator: "e", version: 1, loss: Number.POSITIVE_INFINITY, batches: 1 })).toBe(false)
  })
  it("no schedule, override or plateau state gives an LR above MAX_LR", () => {
    expect(Result.isFailure(resolveSchedule({ kind: "constant", lr: 11 }))).toBe(true)
    const growing = Result.getOrThrow(resolveSchedule({ kind: "exponential", lr: 1, gamma: 2 }))
    expect(lrFrom(initialState(growing), 100)).toBe(MAX_LR)
    expect(parseState({ schedule: { kind: "constant", lr: 0.1 }, overrides: [{ lr: 1e30, fromStep: 0 }], announced: 0 })).toBeUndefined()
  })
})
