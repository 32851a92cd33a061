// Checks: memory stays bounded over a long run. A tiny job (25 batches an epoch, 2 workers,
// 2 parameter-server shards, sync) trains 6 epochs in the test process over a real NATS
// server; every 12 versions the test samples each actor's tables: the shards' held
// gradients, recent decisions and applied log (bitmaps: closed epochs compact away), the
// loader's leases and open epochs, the workers' held batches. Each must stay under a bound
// that does not grow with the steps, and every batch of epochs 0-4 is applied exactly once.
import { mkdtempSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "@effect/vitest"
import { Effect } from "effect"
import { runLoader } from "../actors/loader/loader.ts"
import { runParamServer } from "../actors/param-server/server.ts"
import { runScheduler } from "../actors/scheduler/scheduler.ts"
import { runWorker } from "../actors/worker/worker.ts"
import { Bus } from "../shared/bus/Bus.ts"
import { resolveJob } from "../shared/config/job.ts"
import { decodeBytes } from "../shared/protocol/decode.ts"
import { StepApplied } from "../shared/protocol/messages.ts"
import { subjects } from "../shared/protocol/subjects.ts"
import { jobLayers, uniqueJob, waitUntil } from "./support/control-job.ts"
import { drillCorpus } from "./support/drill-job.ts"
import { acquireNats, type AcquiredNats } from "./support/nats.ts"

const EPOCH = 25
/** 2 workers, 2 batches a version: 75 versions are 6 epochs. */
const STEPS = 75
const EVERY = 12

describe("bounded memory", () => {
  let nats: AcquiredNats
  beforeAll(async () => {
    nats = await acquireNats()
  })
  afterAll(async () => {
    await nats?.stop()
  })

  it.live(`over 6 epochs every table stays bounded and every batch is applied once`, () =>
    Effect.gen(function* () {
      const dir = mkdtempSync(join(tmpdir(), "flotilla-bounded-"))
      const corpus = join(dir, "corpus.txt")
      writeFileSync(corpus, drillCorpus()) // 25 batches of 4 windows of 16 bytes

      const job = resolveJob({
        job: uniqueJob("bounded"),
        model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 },
        data: { corpus, batchSize: 4, valFraction: 0, valBatches: 1 },
        train: { steps: STEPS, evalEvery: 0, checkpointEvery: 50, checkpointDir: join(dir, "ckpt"), heartbeatMs: 200, livenessMs: 3_000 },
        schedule: { kind: "constant", lr: 1e-3 },
        topology: { workers: 2, psShards: 2 }
      })
      const bus = yield* Bus
      const applied: StepApplied[] = []
      yield* bus.subscribe(subjects(job.job).psApplied(0), (m) => Effect.sync(() => {
        const r = decodeBytes(StepApplied, m.subject, m.data)
        if (r._tag === "Success") applied.push(r.success)
      }))
      const loader = yield* runLoader({ job, id: "loader-0" })
      yield* runScheduler({ job, id: "scheduler-0" })
      const servers = [yield* runParamServer({ job, shard: 0, id: "ps-0", resume: false }), yield* runParamServer({ job, shard: 1, id: "ps-1", resume: false })]
      yield* runWorker({ job, id: "worker-0" })
      yield* runWorker({ job, id: "worker-1" })

      const samples: Array<Record<string, number>> = []
      let next = EVERY
      yield* waitUntil("the last version", () => {
        const v = servers[0].state.version
        if (v >= next) {
          next += EVERY
          const [a, b] = servers.map((p) => p.actor())
          const st = loader.status()
          samples.push({
            version: v,
            held: Math.max(a.core.heldCount, b.core.heldCount),
            decisions: Math.max(a.decisions.size, b.decisions.size),
            logBytes: Math.max(a.core.log.bytes, b.core.log.bytes),
            openEpochs: Math.max(a.core.log.openEpochs.length, b.core.log.openEpochs.length),
            leased: st.leased
          })
        }
        return v >= STEPS
      }, 120_000)
      console.info(`[bounded] ${samples.map((x) => JSON.stringify(x)).join("\n  ")}`)
      expect(samples.length).toBeGreaterThanOrEqual(5)
      for (const x of samples) {
        expect(x.held, `held gradients at v${x.version}`).toBeLessThanOrEqual(2)
        expect(x.decisions, `decisions kept at v${x.version}`).toBeLessThanOrEqual(8)
        expect(x.openEpochs, `open epochs in the applied log at v${x.version}`).toBeLessThanOrEqual(2)
        expect(x.logBytes, `applied-log bytes at v${x.version}`).toBeLessThanOrEqual(2 * Math.ceil(EPOCH / 8))
        expect(x.leased, `leases at v${x.version}`).toBeLessThanOrEqual(4)
      }
      // 6 epochs: epochs 0-4 are complete, each batch applied once
      const ids = applied.flatMap((a) => a.batchIds)
      expect(new Set(ids).size, "no batch id twice").toBe(ids.length)
      for (let e = 0; e < 5; e++) for (let i = 0; i < EPOCH; i++) expect(ids, `e${e}-b${i}`).toContain(`e${e}-b${i}`)
      // the closed epochs compacted away: the log knows them complete without a bitmap
      expect(servers[0].state.log.openFrom).toBeGreaterThanOrEqual(5)
    }).pipe(Effect.scoped, Effect.provide(jobLayers(nats.url))), 150_000)
})
