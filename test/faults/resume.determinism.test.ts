// Drill: deterministic resume. A 1-worker, 1-shard job (checkpointEvery 4) runs once
// uninterrupted, then again with its parameter server SIGKILLed at 5 seeded random
// versions and relaunched each time (it resumes from its newest checkpoint; the loader
// re-serves the batches after it, in the original order). The final params of the two
// runs must be bit-identical, and every batch of the run applied exactly once.
// Run: npx vitest run test/faults/resume.determinism.test.ts   (~40-55 s on 2 cores)
import { describe, expect, it } from "vitest"
import type { DrillSpec } from "../support/drill-job.ts"
import { sameParams, seeded, useDrill } from "../support/faults.ts"

const STEPS = 40
const SEED = 7

/** 5 distinct kill versions in [3, STEPS - 4], at least 3 apart, sorted (seeded). */
const killPoints = (): number[] => {
  const rnd = seeded(SEED)
  const out: number[] = []
  while (out.length < 5) {
    const v = 3 + Math.floor(rnd() * (STEPS - 6))
    if (out.every((x) => Math.abs(x - v) >= 3)) out.push(v)
  }
  return out.sort((a, b) => a - b)
}

describe("a 1-worker job SIGKILLed at 5 points resumes bit-identically", () => {
  const suite = useDrill()
  const spec = (job: string): DrillSpec => ({ job, workers: 1, psShards: 1, steps: STEPS, checkpointEvery: 4 })

  it("ends with the same params as an uninterrupted run", async () => {
    const ref = await suite.start(spec("drill-det-ref"))
    ref.startAll()
    await ref.finish(60_000)
    await ref.verify()
    const expected = await ref.params()
    await suite.stopRun(ref)

    const d = await suite.start(spec("drill-det-kill"))
    d.startAll()
    const points = killPoints()
    for (const at of points) {
      await d.waitVersion(at, 60_000)
      await d.relaunch("ps-0")
      await d.waitVersion(at + 1, 60_000)
    }
    console.info(`[resume.determinism] SIGKILLed ps-0 at versions ${points.join(", ")}`)
    await d.finish(60_000)
    const r = await d.verify()
    console.info(`[resume.determinism] ${JSON.stringify(r)}`)
    const got = await d.params()
    expect(sameParams(expected, got), `final params vs the uninterrupted run${d.why()}`).toBeUndefined()
  }, 180_000)
})
