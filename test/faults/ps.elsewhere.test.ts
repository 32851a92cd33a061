// Drill: a parameter server relaunched "on another host" resumes. The job keeps its
// checkpoints in the JetStream object store (train.checkpointStore: jetstream); the
// parameter server is SIGKILLed, its local checkpoint folder is deleted (a new host has
// none), and it is relaunched: it resumes from the newest checkpoint in JetStream (not
// from version 0), and the job completes with every planned batch applied exactly once.
// Run: npx vitest run test/faults/ps.elsewhere.test.ts   (~20 s on 2 cores)
import { existsSync, rmSync } from "node:fs"
import { describe, expect, it } from "vitest"
import { useDrill } from "../support/faults.ts"

describe("a parameter server relaunched on another host (JetStream checkpoints)", () => {
  const suite = useDrill({ jetstream: true })

  it("resumes from the store's newest checkpoint; the job completes, each batch once", async () => {
    const d = await suite.start({ job: "drill-ps-elsewhere", workers: 1, psShards: 1, steps: 40, checkpointEvery: 5, train: { checkpointStore: "jetstream" } })
    d.startAll()
    await d.waitVersion(17, 60_000)
    const dir = d.job.train.checkpointDir
    await d.actor("ps-0").kill()
    rmSync(dir, { recursive: true, force: true })
    const ps = await d.relaunch("ps-0")
    const line = await ps.waitForLine(/resumed shard 0 at version \d+ from jetstream:\/\//, 30_000)
    const at = Number(/at version (\d+)/.exec(line)![1])
    console.info(`[ps.elsewhere] ${line.replace(/^\S+ \S+\s+/, "")}`)
    expect(at).toBeGreaterThanOrEqual(15)
    expect(at % 5).toBe(0)
    expect(existsSync(dir), "nothing was written to local disk").toBe(false)
    await d.finish(60_000)
    await d.verify()
  }, 120_000)
})
