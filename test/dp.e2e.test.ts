// Checks: a whole data-parallel job as separate processes over real NATS — loader, LR
// scheduler, 2 parameter-server shards, an evaluator and 2 workers — trains a tiny GPT on
// Moby Dick for 40 versions: validation loss falls clearly, every version is applied by
// both shards from the same batches (each batch once), both workers contribute, the LR
// the shards used is the scheduler's schedule, nothing is rejected, workers and the
// evaluator exit 0 at the end and each shard checkpoints its final version.
// Run: npx vitest run test/dp.e2e.test.ts   (~40-60 s on 2 cores, mostly process start-up)
import { existsSync } from "node:fs"
import { join } from "node:path"
import { describe, expect, it } from "vitest"
import { lrAt, resolveSchedule, type ScheduleInput } from "../shared/schedule/schedules.ts"
import { useCluster } from "./support/cluster.ts"

const STEPS = 40

const JOB = {
  job: "dp-e2e",
  model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 },
  data: { batchSize: 4, valBatches: 2 },
  train: { steps: STEPS, evalEvery: 10, checkpointEvery: 0, heartbeatMs: 200, livenessMs: 15_000, leaseTimeoutMs: 20_000 },
  schedule: { kind: "cosine", lr: 1e-2, minLr: 1e-3 },
  topology: { workers: 2, psShards: 2 }
}

describe("data-parallel job, every actor its own process", () => {
  const suite = useCluster()


  it("trains a tiny GPT for 40 versions: validation loss falls, every batch applied once", async () => {
    const { cluster, obs } = await suite.start(JOB)
    const job = cluster.job
    cluster.spawnServices()
    const evaluator = cluster.spawn("evaluator", "evaluator-0")
    // the untrained model's validation loss first: the evaluator needs longer to start than
    // the shards need to apply version 1 once workers are there
    await obs.until(() => obs.validation.some((v) => v.version === 0), 60_000, () => `the evaluator's report on version 0\n${cluster.logs()}`)
    const workers = [cluster.spawn("worker", "worker-0"), cluster.spawn("worker", "worker-1")]
    await obs.until(
      () => obs.validation.some((v) => v.version >= STEPS),
      80_000,
      () => `the evaluator's report on version ${STEPS} (at version ${obs.version()}, validation ${JSON.stringify(obs.validation.map((v) => [v.version, v.loss]))})\n${cluster.logs()}`
    )

    // ---- learning
    const val = [...obs.validation].sort((a, b) => a.version - b.version)
    expect(val.map((v) => v.version)).toEqual([0, 10, 20, 30, 40])
    const first = val[0].loss
    const final = val[val.length - 1].loss
    console.info(`[dp.e2e] validation loss ${val.map((v) => `v${v.version} ${v.loss.toFixed(3)}`).join(", ")}`)
    expect(first).toBeGreaterThan(Math.log(256) - 0.2) // an untrained byte model: ~ln 256
    expect(final, `validation loss ${first} → ${final}`).toBeLessThan(first - 0.5)

    // ---- every version, both shards, the same batches, each batch once
    const shards = [obs.appliedOf(0), obs.appliedOf(1)]
    for (const applied of shards) expect(applied.map((a) => a.version)).toEqual(Array.from({ length: STEPS }, (_, i) => i + 1))
    for (let i = 0; i < STEPS; i++) {
      expect(shards[1][i].batchIds).toEqual(shards[0][i].batchIds)
      expect(shards[1][i].contributors).toEqual(shards[0][i].contributors)
    }
    for (const applied of shards) {
      const ids = applied.flatMap((a) => a.batchIds)
      expect(new Set(ids).size, "no batch applied twice").toBe(ids.length)
    }
    const both = shards[0].filter((a) => a.contributors.length === 2).length
    expect(both, "versions with both workers' gradients").toBeGreaterThanOrEqual(STEPS - 2)
    expect(new Set(shards[0].flatMap((a) => a.contributors))).toEqual(new Set(["worker-0", "worker-1"]))
    expect(shards[0][STEPS - 1].final).toBe(true)

    // ---- the LR of version v+1 is the schedule's LR of step v (asked of the scheduler)
    const schedule = resolveSchedule(job.schedule as unknown as ScheduleInput)
    if (schedule._tag !== "Success") throw new Error("schedule")
    for (const a of shards[0]) expect(a.lr).toBeCloseTo(lrAt(schedule.success, a.version - 1), 12)
    expect(obs.errors, `nothing rejected: ${JSON.stringify(obs.errors)}`).toEqual([])

    // ---- the end: workers and evaluator leave by themselves, shards checkpoint
    for (const p of [...workers, evaluator]) expect(await p.exited, p.id).toEqual({ code: 0, signal: null })
    for (let k = 0; k < 2; k++) {
      const file = join(job.train.checkpointDir, job.job, `ps-${k}`, `v${String(STEPS).padStart(8, "0")}.ckpt`)
      await obs.until(() => existsSync(file), 10_000, `checkpoint ${file}`)
    }
  })
})
