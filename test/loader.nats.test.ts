// Checks: the loader actor over a real nats-server, through LoaderClient — it answers
// "rebuilding" until every parameter-server shard sent its applied log, then serves epoch 0
// in order; a release counts only from the owner under the current gen; PushAck from every
// shard makes a lease "pushed" (its owner leaving does not re-issue it); StepApplied makes a
// batch done; a PS restart (a new incarnation in its heartbeat, a log from its checkpoint) is
// a new gen that serves again the batches after the checkpoint, in order; bad requests are
// rejected; with no loader, a lease is `Failed`. The parameter servers here are small fakes
// (real NATS participants) that answer GetAppliedLog and publish heartbeats, PushAck and
// StepApplied as the real one does.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs"
import { hostname, tmpdir } from "node:os"
import { join } from "node:path"
import { tokenizerFromJson } from "../shared/data/tokenizer.ts"
import { afterAll, beforeAll, describe, expect, it } from "@effect/vitest"
import { Effect, Exit, Ref, Result, Schedule, Scope } from "effect"
import { runLoader, type LoaderHandle } from "../actors/loader/loader.ts"
import { LoaderClient, type LeaseResult } from "../actors/loader/protocol.ts"
import { Bus, encodeUtf8 } from "../shared/bus/Bus.ts"
import { NatsBus } from "../shared/bus/nats.ts"
import { resolveJob, type JobConfig } from "../shared/config/job.ts"
import { AppliedLog, parseBatchId } from "../shared/protocol/applied-log.ts"
import { decodeBytes, encodeMessage } from "../shared/protocol/decode.ts"
import { Heartbeat, Rejected, type PushAck, type StepApplied } from "../shared/protocol/messages.ts"
import { PROTOCOL_VERSION, subjects, type Subjects } from "../shared/protocol/subjects.ts"
import { acquireNats, type AcquiredNats } from "./support/nats.ts"

let nats: AcquiredNats
beforeAll(async () => {
  nats = await acquireNats()
})
afterAll(async () => {
  await nats?.stop()
})

let counter = 0
const makeJob = (): JobConfig =>
  resolveJob({
    job: `loader-${process.pid}-${Date.now().toString(36)}-${counter++}`,
    model: { kind: "gpt", vocabSize: 256, contextLength: 8, layers: 1, heads: 1, width: 8 },
    data: { batchSize: 2, valBatches: 1 },
    train: { steps: 100, checkpointEvery: 0, heartbeatMs: 100, livenessMs: 600, leaseTimeoutMs: 5_000 },
    topology: { workers: 1, psShards: 2 }
  })

const fast = { tickMs: 50, logRetryMs: 100, logTimeoutMs: 500, refreshMs: 0 } as const

/** A stand-in parameter-server shard: its applied log, heartbeats, PushAck and StepApplied. */
const fakePs = (s: Subjects, shard: number, incarnation: number, applied: readonly string[] = []) =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const scope = yield* Scope.make()
    // what this shard applied: changed by the test's fiber, read by the responder's
    const applied$ = yield* Ref.make<readonly string[]>(applied)
    const logOf = (ids: readonly string[]) => {
      const log = new AppliedLog()
      for (const id of ids) log.add(parseBatchId(id)!)
      return { _tag: "AppliedLog" as const, v: PROTOCOL_VERSION, shard, incarnation, version: ids.length, log: log.toJSON() }
    }
    yield* bus
      .subscribe(s.psLog(shard), (m) => Ref.get(applied$).pipe(Effect.flatMap((ids) => bus.respond(m, encodeMessage(logOf(ids))))))
      .pipe(Scope.provide(scope))
    const beat = Ref.get(applied$).pipe(
      Effect.flatMap((ids) =>
        bus.publish(
          s.hb("ps", `ps-${shard}`),
          encodeMessage({ _tag: "Heartbeat", v: PROTOCOL_VERSION, role: "ps", id: `ps-${shard}`, host: hostname(), pid: process.pid, startedAt: incarnation, seq: 0, state: "running", info: { shard, version: ids.length, incarnation } } satisfies Heartbeat)
        )
      ),
      Effect.ignore
    )
    yield* Effect.forkIn(beat.pipe(Effect.repeat(Schedule.spaced(100))), scope)
    yield* bus.flush()
    const ack = (worker: string, batchId: string) =>
      Ref.get(applied$).pipe(
        Effect.flatMap((ids) =>
          bus.publish(s.psAck(shard, worker), encodeMessage({ _tag: "PushAck", v: PROTOCOL_VERSION, shard, incarnation, sender: worker, batchId, version: ids.length, status: "held" } satisfies PushAck))
        )
      )
    return {
      ack,
      /** the push of `ids` by `worker` is acknowledged, then applied. */
      apply: (worker: string, ids: readonly string[]) =>
        Effect.gen(function* () {
          yield* ack(worker, ids.join("+"))
          const now = yield* Ref.updateAndGet(applied$, (xs) => [...xs, ...ids])
          const a: StepApplied = { _tag: "StepApplied", v: PROTOCOL_VERSION, shard, incarnation, version: now.length, batchIds: ids, contributors: [worker], samples: 2, tokens: 16, loss: 1, lr: 1, gradNorm: 1, maxStaleness: 0, aggregateMs: 0, at: Date.now(), final: false }
          yield* bus.publish(s.psApplied(shard), encodeMessage(a))
          yield* bus.flush()
        }),
      kill: Scope.close(scope, Exit.void)
    }
  })

const waitUntil = (what: string, pred: () => boolean, timeoutMs = 10_000) =>
  Effect.gen(function* () {
    const deadline = Date.now() + timeoutMs
    while (!pred()) {
      if (Date.now() > deadline) return yield* Effect.die(new Error(`timed out waiting for ${what}`))
      yield* Effect.sleep(20)
    }
  })

/** Lease until the loader hands out a batch (it may be rebuilding); returns its meta. */
const leaseBatch = (s: Subjects, worker: string, minGen = 0) =>
  Effect.gen(function* () {
    const bus = yield* Bus
    for (let i = 0; i < 200; i++) {
      const r = yield* LoaderClient.lease(bus, s, worker, "train", undefined, 2_000)
      if (r._tag === "Batch" && r.meta.gen >= minGen) return r
      yield* Effect.sleep(r._tag === "NoBatch" ? Math.min(r.retryAfterMs, 100) : 50)
    }
    return yield* Effect.die(new Error(`${worker} got no batch`))
  })

const idOf = (r: LeaseResult) => (r._tag === "Batch" ? r.meta.batchId : `${r._tag}: ${r.reason}`)

describe("loader over NATS", () => {
  it.live("answers 'rebuilding' until every shard's log is in; then serves in order, honours owner-only failures, counts done", () =>
    Effect.gen(function* () {
      const bus = yield* Bus
      const job = makeJob()
      const s = subjects(job.job)
      const ps0 = yield* fakePs(s, 0, 100)
      const loader: LoaderHandle = yield* runLoader({ job, id: "loader-0", ...fast })
      const first = yield* LoaderClient.lease(bus, s, "w0", "train")
      expect(first).toMatchObject({ _tag: "NoBatch", reason: "rebuilding" })
      expect(loader.status().rebuilding).toBe(true)
      const ps1 = yield* fakePs(s, 1, 200)

      const a = yield* leaseBatch(s, "w0")
      expect([a.meta.batchId, a.meta.attempt, a.meta.epochBatches]).toEqual(["e0-b0", 1, loader.plan.batchesPerEpoch])
      expect(a.batch.tensors.get("tokens")).toEqual(loader.plan.trainBatch(0, 0).tensors.get("tokens"))
      const b = yield* leaseBatch(s, "w0")
      expect(b.meta.batchId).toBe("e0-b1")

      // a release from someone else, or of another gen, counts for nothing; the owner's does
      yield* LoaderClient.fail(bus, s, "w1", "e0-b1", b.meta.gen, "not mine")
      yield* LoaderClient.fail(bus, s, "w0", "e0-b1", b.meta.gen - 1, "old gen")
      yield* bus.flush()
      yield* Effect.sleep(150)
      expect(loader.status().leased).toBe(2)
      yield* LoaderClient.fail(bus, s, "w0", "e0-b1", b.meta.gen, "stale")
      yield* waitUntil("the release", () => loader.status().leased === 1)
      const again = yield* leaseBatch(s, "w1")
      expect([again.meta.batchId, again.meta.attempt]).toEqual(["e0-b1", 2])

      // applied on both shards: done, and its lease is gone
      yield* ps0.apply("w0", ["e0-b0"])
      yield* ps1.apply("w0", ["e0-b0"])
      yield* waitUntil("e0-b0 done", () => loader.status().done === 1 && loader.status().leased === 1)
      expect((yield* leaseBatch(s, "w0")).meta.batchId).toBe("e0-b2")

      // val batches, bad requests
      const val = yield* LoaderClient.lease(bus, s, "e0", "val", 0)
      expect(val).toMatchObject({ _tag: "Batch", meta: { batchId: "val-0", split: "val" } })
      expect(yield* LoaderClient.lease(bus, s, "e0", "val", 5)).toMatchObject({ _tag: "Failed", reason: expect.stringMatching(/val batch index/) })
      const bad = yield* bus.request(s.dataLease("w1"), encodeUtf8("{nope"), { timeoutMs: 2_000 })
      const rej = decodeBytes(Rejected, bad.subject, bad.data)
      expect(Result.isSuccess(rej) && rej.success.reason).toMatch(/not JSON/)

      // pause / resume through the handle
      loader.setPaused(true)
      expect(yield* LoaderClient.lease(bus, s, "w0", "train")).toMatchObject({ _tag: "NoBatch", reason: "paused" })
      loader.setPaused(false)
      expect(idOf(yield* LoaderClient.lease(bus, s, "w0", "train"))).toBe("e0-b3")
    }).pipe(Effect.scoped, Effect.provide(NatsBus.layer({ servers: nats.url }))), 30_000)

  it.live("a classifier's batches carry tokens and labels; a failed lease is served again as the same rows; data.info names the classes and the tokenizer", () =>
    Effect.gen(function* () {
      const bus = yield* Bus
      const dir = mkdtempSync(join(tmpdir(), "flotilla-loader-cls-"))
      const corpus = join(dir, "texts.jsonl")
      writeFileSync(corpus, Array.from({ length: 30 }, (_, i) => JSON.stringify({ text: `${i % 2 ? "buy now" : "see you"} item ${i}`, label: i % 2 ? "spam" : "ham" })).join("\n"))
      const job = resolveJob({
        job: `loader-cls-${process.pid}-${Date.now().toString(36)}`,
        model: { kind: "lstm-classifier", vocabSize: 50, embedDim: 4, hidden: 4, dense: 2, maxLen: 5, maskPadding: true },
        data: { corpus, batchSize: 4, valFraction: 0.2, seed: 1 },
        train: { steps: 100, checkpointEvery: 0, heartbeatMs: 100, livenessMs: 600, leaseTimeoutMs: 5_000 },
        topology: { workers: 1, psShards: 1 }
      })
      const s = subjects(job.job)
      yield* fakePs(s, 0, 100)
      const loader = yield* runLoader({ job, id: "loader-0", ...fast, runsDir: dir })
      const a = yield* leaseBatch(s, "w0")
      const want = loader.plan.trainBatch(0, 0)
      expect(a.meta.batchId).toBe("e0-b0")
      expect(a.batch.size).toBe(4)
      expect(a.batch.tensors.get("tokens")).toEqual(want.tensors.get("tokens"))
      expect(a.batch.tensors.get("labels")).toEqual(want.tensors.get("labels"))
      yield* LoaderClient.fail(bus, s, "w0", a.meta.batchId, a.meta.gen, "compute failed")
      const again = yield* leaseBatch(s, "w0")
      expect([again.meta.batchId, again.meta.attempt]).toEqual(["e0-b0", 2])
      expect(again.batch.tensors.get("labels")).toEqual(want.tensors.get("labels"))
      expect(again.batch.tensors.get("tokens")).toEqual(want.tensors.get("tokens"))
      // the whole validation split, the last batch shorter (6 texts in batches of 4)
      const v1 = yield* LoaderClient.lease(bus, s, "e0", "val", 1)
      expect(v1).toMatchObject({ _tag: "Batch", meta: { valBatches: 2, B: 2 } })
      const info = yield* LoaderClient.info(bus, s, "test")
      expect(info).toMatchObject({ task: "classify", labels: ["ham", "spam"], trainSamples: 24, valSamples: 6, epochBatches: 6 })
      expect(tokenizerFromJson(info.tokenizer).words).toContain("buy")
      const split = JSON.parse(readFileSync(join(dir, job.job, "split.json"), "utf8"))
      expect(split.counts).toEqual({ train: { ham: 12, spam: 12 }, val: { ham: 3, spam: 3 } })
      rmSync(dir, { recursive: true, force: true })
    }).pipe(Effect.scoped, Effect.provide(NatsBus.layer({ servers: nats.url }))), 30_000)

  it.live("a PS restart from a checkpoint is a new gen: the batches after the checkpoint are served again, in order", () =>
    Effect.gen(function* () {
      const job = makeJob()
      const s = subjects(job.job)
      const ps0 = yield* fakePs(s, 0, 100)
      const ps1 = yield* fakePs(s, 1, 200)
      const loader = yield* runLoader({ job, id: "loader-0", ...fast })
      const ids: string[] = []
      let gen = 0
      for (let i = 0; i < 4; i++) {
        const l = yield* leaseBatch(s, "w0")
        ids.push(l.meta.batchId)
        gen = l.meta.gen
      }
      expect(ids).toEqual(["e0-b0", "e0-b1", "e0-b2", "e0-b3"])
      for (const id of ids) {
        yield* ps0.apply("w0", [id])
        yield* ps1.apply("w0", [id])
      }
      yield* waitUntil("4 done", () => loader.status().done === 4)
      // shard 1 dies and comes back from a checkpoint that holds e0-b0 and e0-b1
      yield* ps1.kill
      yield* fakePs(s, 1, 300, ["e0-b0", "e0-b1"])
      yield* waitUntil("the rebuild", () => loader.status().gen > gen && !loader.status().rebuilding)
      expect(loader.status()).toMatchObject({ done: 2, leased: 0 })
      const after: string[] = []
      for (let i = 0; i < 3; i++) after.push((yield* leaseBatch(s, "w0", gen + 1)).meta.batchId)
      expect(after).toEqual(["e0-b2", "e0-b3", "e0-b4"])
    }).pipe(Effect.scoped, Effect.provide(NatsBus.layer({ servers: nats.url }))), 30_000)

  it.live("a worker that leaves gets back what every shard did not acknowledge; a lease without a loader is Failed", () =>
    Effect.gen(function* () {
      const bus = yield* Bus
      const job = makeJob()
      const s = subjects(job.job)
      const ps0 = yield* fakePs(s, 0, 100)
      const ps1 = yield* fakePs(s, 1, 200)
      const hb = (state: "running" | "leaving") =>
        bus.publish(s.hb("worker", "w-a"), encodeMessage({ _tag: "Heartbeat", v: PROTOCOL_VERSION, role: "worker", id: "w-a", host: hostname(), pid: 1, startedAt: 1, seq: 0, state } satisfies Heartbeat))
      const loader = yield* runLoader({ job, id: "loader-0", ...fast })
      yield* hb("running")
      const x = yield* leaseBatch(s, "w-a")
      const y = yield* leaseBatch(s, "w-a")
      expect([x.meta.batchId, y.meta.batchId]).toEqual(["e0-b0", "e0-b1"])
      yield* ps0.ack("w-a", "e0-b0")
      yield* ps1.ack("w-a", "e0-b0")
      yield* ps0.ack("w-a", "e0-b1") // one shard of two
      yield* bus.flush()
      yield* Effect.sleep(200)
      yield* hb("leaving")
      yield* waitUntil("the re-issue", () => loader.status().leased === 1)
      const z = yield* leaseBatch(s, "w-b")
      expect([z.meta.batchId, z.meta.attempt]).toEqual(["e0-b1", 2])
      expect((yield* leaseBatch(s, "w-b")).meta.batchId).toBe("e0-b2")

      const none = yield* LoaderClient.lease(bus, subjects(`${job.job}-nobody`), "w0", "train", undefined, 500)
      expect(none._tag).toBe("Failed")
    }).pipe(Effect.scoped, Effect.provide(NatsBus.layer({ servers: nats.url }))), 30_000)
})
