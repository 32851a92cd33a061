// Checks: every actor survives bad input and tells the sender why. Loader, scheduler and
// a parameter server run (in this process) on a real NATS server; the test sends them
// malformed JSON, wrong types, gradient bundles with wrong shapes, NaN, unknown tensors,
// duplicates, corrupt chunks and oversize messages. Each is rejected with a reason on the
// job's `errors` subject (and as the reply to a request), nothing is applied, and every
// actor still serves valid requests afterwards.
import { Effect, Layer, Result } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { mkdtempSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { runLoader } from "../actors/loader/loader.ts"
import { runParamServer } from "../actors/param-server/server.ts"
import { runScheduler } from "../actors/scheduler/scheduler.ts"
import { Bus, MaxPayloadExceededError } from "../shared/bus/Bus.ts"
import { NatsBus } from "../shared/bus/nats.ts"
import { resolveJob } from "../shared/config/job.ts"
import { decodeBytes, encodeMessage } from "../shared/protocol/decode.ts"
import { HEADER_BATCH, LrForStep, Rejected } from "../shared/protocol/messages.ts"
import { PROTOCOL_VERSION, subjects } from "../shared/protocol/subjects.ts"
import { frameMessage, H } from "../shared/wire/frames.ts"
import { encodeBundle, manifestToJson, type TensorBundle } from "../shared/wire/tensor.ts"
import { requestBundle, sendBundle } from "../shared/wire/transport.ts"
import { makeModel } from "../shared/models/zoo.ts"
import { acquireNats, type AcquiredNats } from "./support/nats.ts"

const job = resolveJob({
  job: "robust",
  model: { kind: "gpt", vocabSize: 256, contextLength: 8, layers: 1, heads: 1, width: 8 },
  data: { batchSize: 2 },
  train: { steps: 100, checkpointEvery: 0, checkpointDir: join(mkdtempSync(join(tmpdir(), "flotilla-robust-")), "ckpt") },
  topology: { workers: 1, psShards: 1 }
})
const s = subjects(job.job)
const utf8 = (x: string) => new TextEncoder().encode(x)

describe("actors under bad input", () => {
  let nats: AcquiredNats
  beforeAll(async () => {
    nats = await acquireNats()
  })
  afterAll(async () => {
    await nats?.stop()
  })

  it("reject every bad message with a reason, apply nothing, and keep serving", async () => {
    const program = Effect.gen(function* () {
      const bus = yield* Bus
      const errors: Rejected[] = []
      yield* bus.subscribe(s.errors, (m) => {
        const r = decodeBytes(Rejected, m.subject, m.data)
        if (Result.isSuccess(r)) errors.push(r.success)
        return Effect.void
      })
      yield* runLoader({ job, id: "loader-0" })
      yield* runScheduler({ job, id: "scheduler-0" })
      const ps = yield* runParamServer({ job, shard: 0, id: "ps-0", resume: false, minWorkers: 0 })
      const before = new Map([...ps.state.params].map(([k, v]) => [k, Float32Array.from(v)]))
      const waitErrors = (n: number) =>
        Effect.gen(function* () {
          for (let i = 0; i < 200 && errors.length < n; i++) yield* Effect.sleep(25)
        })

      // ---- requests: each bad one is answered with a Rejected
      const badRequests: Array<[string, Uint8Array, RegExp]> = [
        [s.dataLease("w1"), utf8("{not json"), /not JSON/],
        [s.dataLease("w1"), utf8(JSON.stringify({ _tag: "LeaseBatch", v: 1, worker: "w 1", split: "train" })), /worker|pattern|Expected/],
        [s.dataLease("w1"), utf8(JSON.stringify({ _tag: "LeaseBatch", v: 1, worker: "w1", split: "val", index: 99 })), /val batch index/],
        // a lease for another worker on one's own subject
        [s.dataLease("w2"), utf8(JSON.stringify({ _tag: "LeaseBatch", v: 1, worker: "w1", split: "train" })), /names worker "w1": a worker asks on its own subject only/],
        [s.lr, utf8(JSON.stringify({ _tag: "GetLr", v: 1, step: -3 })), /greater than or equal to 0|step/],
        [s.psPull(0), utf8(JSON.stringify({ _tag: "PullParams", v: 2, worker: "w1", minVersion: 0 })), /Expected|v/],
        [s.lr, new Uint8Array(0), /empty payload/]
      ]
      for (const [subject, data, re] of badRequests) {
        const reply = yield* bus.request(subject, data, { timeoutMs: 3_000 })
        const r = decodeBytes(Rejected, reply.subject, reply.data)
        expect(Result.isSuccess(r), `${subject}: ${new TextDecoder().decode(reply.data)}`).toBe(true)
        if (Result.isSuccess(r)) expect(r.success.reason, subject).toMatch(re)
      }
      yield* waitErrors(badRequests.length)
      expect(errors.length).toBeGreaterThanOrEqual(badRequests.length)

      // ---- gradient pushes: wrong shapes, NaN, unknown tensors, wrong kind, duplicates
      const model = makeModel(job.model)
      const good = (batchId: string, fill = 0.01): TensorBundle => ({
        tensors: model.specs.map((sp) => ({ name: sp.name, dtype: "float32" as const, shape: sp.shape, data: new Float32Array(sp.shape.reduce((a, b) => a * b, 1)).fill(fill) })),
        meta: { kind: "grads", job: job.job, version: 0, step: 0, sender: "w-bad", batchId, codec: "f32", extra: { samples: 2, tokens: 16, loss: 5, normSq: 0, micro: batchId, gen: 0, epochBatches: 0, incarnation: ps.actor().incarnation } }
      })
      const wrongShape = good("e0-b1")
      const nan = good("e0-b2")
      ;(nan.tensors[0].data as Float32Array)[3] = Number.NaN
      const unknown = good("e0-b3")
      const bundles: Array<[TensorBundle, RegExp]> = [
        [{ ...wrongShape, tensors: [{ ...wrongShape.tensors[0], shape: [1], data: new Float32Array(1) }, ...wrongShape.tensors.slice(1)] }, /has shape \[1\], the model.s is \[256,8\]/],
        [nan, /NaN/],
        [{ ...unknown, tensors: [...unknown.tensors, { name: "intruder", dtype: "float32", shape: [1], data: new Float32Array(1) }] }, /not owned.*intruder/],
        [{ ...good("e0-b4"), meta: { ...good("e0-b4").meta, kind: "params" } }, /expected a grads bundle/],
        [{ ...good("e0-b7"), meta: { ...good("e0-b7").meta, extra: { samples: 2 } } }, /Missing key/],
        [{ ...good("e0-b8"), meta: { ...good("e0-b8").meta, extra: { ...good("e0-b8").meta.extra, incarnation: 1 } } }, /incarnation 1.*restarted/]
      ]
      const n0 = errors.length
      for (const [b] of bundles) yield* sendBundle(bus, s.psPush(0, "w-bad"), b)
      // a corrupt chunk: a frame whose CRC does not match its data
      const enc = Result.getOrThrow(encodeBundle(good("e0-b5")))
      const frames = Result.getOrThrow(frameMessage(enc.payload, { id: "corrupt-1", maxPayload: bus.maxPayload, manifest: manifestToJson(enc.manifest) }))
      const data = Uint8Array.from(frames[0].data)
      data[data.length - 1] ^= 0xff
      yield* bus.publish(s.psPush(0, "w-bad"), data, { headers: frames[0].headers })
      // garbage that is not a frame at all
      yield* bus.publish(s.psPush(0, "w-bad"), utf8("hello"), { headers: { [H.wire]: "1" } })
      yield* waitErrors(n0 + bundles.length + 2)
      const pushErrors = errors.slice(n0)
      for (const [, re] of bundles) expect(pushErrors.some((e) => re.test(e.reason)), `${re} in ${JSON.stringify(pushErrors.map((e) => e.reason))}`).toBe(true)
      expect(pushErrors.some((e) => e.code === "wire" && /crc|CRC/i.test(e.reason))).toBe(true)
      expect(pushErrors.filter((e) => e.code === "wire").length).toBeGreaterThanOrEqual(2)
      for (const e of pushErrors.filter((e) => e.code !== "wire")) expect(e.sender).toBe("w-bad")

      // ---- oversize: the bus refuses before sending, with a typed error
      const big = yield* bus.publish(s.dataAck("w1"), new Uint8Array(bus.maxPayload + 1)).pipe(Effect.flip)
      expect(big).toBeInstanceOf(MaxPayloadExceededError)

      // ---- nothing was applied; a valid gradient still is, once; its duplicate is rejected
      expect(ps.state.version).toBe(0)
      for (const [k, v] of before) expect(ps.state.params.get(k)).toEqual(v)
      yield* sendBundle(bus, s.psPush(0, "w-bad"), good("e0-b6"))
      for (let i = 0; i < 200 && ps.state.version < 1; i++) yield* Effect.sleep(25)
      expect(ps.state.version).toBe(1)
      const n1 = errors.length
      // (a resend of e0-b6 alone is acknowledged as applied; inside another gradient it is a duplicate)
      yield* sendBundle(bus, s.psPush(0, "w-bad"), { ...good("e0-b6+e0-b9"), meta: { ...good("e0-b6+e0-b9").meta, version: 1 } })
      yield* waitErrors(n1 + 1)
      expect(errors.slice(n1).map((e) => e.code)).toContain("duplicate")
      expect(ps.state.version).toBe(1)

      // ---- and every actor still answers valid requests
      // (the loader builds its table from the servers' applied logs first: NoBatch "rebuilding" meanwhile)
      let lease = yield* bus.request(s.dataLease("w1"), encodeMessage({ _tag: "LeaseBatch", v: PROTOCOL_VERSION, worker: "w1", split: "train" }))
      for (let i = 0; i < 50 && lease.headers[HEADER_BATCH] === undefined; i++) {
        yield* Effect.sleep(100)
        lease = yield* bus.request(s.dataLease("w1"), encodeMessage({ _tag: "LeaseBatch", v: PROTOCOL_VERSION, worker: "w1", split: "train" }))
      }
      expect(lease.headers[HEADER_BATCH], new TextDecoder().decode(lease.data)).toBeDefined()
      expect(lease.data.byteLength).toBe(2 * 9 * 4)
      const lr = yield* bus.request(s.lr, encodeMessage({ _tag: "GetLr", v: PROTOCOL_VERSION, step: 1 }))
      expect(Result.isSuccess(decodeBytes(LrForStep, lr.subject, lr.data))).toBe(true)
      const pulled = yield* requestBundle(bus, s.psPull(0), encodeMessage({ _tag: "PullParams", v: PROTOCOL_VERSION, worker: "w1", minVersion: 0 }))
      expect(pulled.bundle.meta.version).toBe(1)
    })
    await Effect.runPromise(program.pipe(Effect.scoped, Effect.provide(Layer.mergeAll(NatsBus.layer({ servers: nats.url })))))
  }, 60_000)
})
