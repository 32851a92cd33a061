// Checks: job files — defaults resolve, JSON and YAML load, and every bad field gets a
// message that names it (model, data, train, optimizer, schedule), never a crash.
import { mkdtempSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { describe, expect, it } from "vitest"
import { DEFAULT_JOB, JobConfigError, loadJobFile, resolveJob } from "../shared/config/job.ts"

const dir = mkdtempSync(join(tmpdir(), "flotilla-config-"))
const file = (name: string, text: string) => {
  const p = join(dir, name)
  writeFileSync(p, text)
  return p
}
const error = (f: () => unknown): string => {
  try {
    f()
  } catch (e) {
    expect(e).toBeInstanceOf(JobConfigError)
    return (e as Error).message
  }
  throw new Error("expected a JobConfigError")
}

describe("job config", () => {
  it("resolves the defaults, with the schedule's horizon and warmup following the steps", () => {
    const job = resolveJob({})
    expect(job.job).toBe(DEFAULT_JOB.job)
    expect(job.model).toEqual(DEFAULT_JOB.model)
    expect(job.schedule).toMatchObject({ kind: "cosine", totalSteps: job.train.steps })
    const short = resolveJob({ train: { steps: 30 } })
    expect(short.schedule).toMatchObject({ totalSteps: 30, warmupSteps: 2 })
    expect(short.optimizer).toMatchObject({ kind: "adamw", beta1: 0.9, beta2: 0.999 })
  })

  it("loads JSON and YAML files, merging over the defaults", () => {
    const j = loadJobFile(file("a.json", JSON.stringify({ job: "a", train: { steps: 7 }, topology: { workers: 3 } })))
    expect([j.job, j.train.steps, j.topology.workers, j.topology.psShards]).toEqual(["a", 7, 3, 1])
    const y = loadJobFile(file("b.yaml", "job: b\nmodel: { kind: gpt, vocabSize: 256, contextLength: 32, layers: 1, heads: 2, width: 32 }\noptimizer: { kind: sgd, momentum: 0.9 }\n"))
    expect([y.job, y.model.kind === "gpt" && y.model.contextLength, y.optimizer.kind]).toEqual(["b", 32, "sgd"])
  })

  it("a job bounded by epochs: steps unbounded unless given, a per-epoch schedule's horizon in epochs, classifier defaults", () => {
    const j = resolveJob({ model: { kind: "lstm-classifier", maxLen: 50 }, train: { epochs: 50, evalEvery: "epoch" }, schedule: { kind: "cosine", per: "epoch", lr: 0.01 } })
    expect(j.train.steps).toBe(Number.MAX_SAFE_INTEGER)
    expect(j.model).toEqual({ kind: "lstm-classifier", vocabSize: 10_000, embedDim: 64, hidden: 64, dense: 64, maxLen: 50, maskPadding: true })
    expect(j.schedule).toMatchObject({ kind: "cosine", per: "epoch", totalSteps: 50 })
    expect(resolveJob({ train: { epochs: 5, steps: 300 } }).train.steps).toBe(300)
    expect(() => resolveJob({ train: { evalEvery: "weekly" } })).toThrow(/evalEvery/)
  })

  it("names the bad field", () => {
    expect(error(() => resolveJob({ train: { steps: -1 } }))).toMatch(/steps/)
    expect(error(() => resolveJob({ train: { steps: "ten" } }))).toMatch(/steps/)
    expect(error(() => resolveJob({ model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 3, width: 16 } }))).toMatch(/model\.width .*heads/)
    expect(error(() => resolveJob({ model: { kind: "transformer-xl" } }))).toMatch(/model|kind/)
    expect(error(() => resolveJob({ data: { valFraction: 1.5 } }))).toMatch(/valFraction/)
    expect(error(() => resolveJob({ job: "bad name!" }))).toMatch(/job/)
    expect(error(() => resolveJob({ optimizer: { kind: "adam", beta2: 1.2 } }))).toMatch(/beta2/)
    expect(error(() => resolveJob({ optimizer: { kind: "adam", weight_decay: 0.1 } }))).toMatch(/weight_decay/)
    expect(error(() => resolveJob({ schedule: { kind: "step", lr: 0.1 } }))).toMatch(/stepSize/)
    expect(error(() => resolveJob({ train: { consistency: { mode: "bounded" } } }))).toMatch(/staleness|consistency/)
    expect(error(() => resolveJob([1, 2]))).toMatch(/object/)
  })

  it("says what is wrong with an unreadable or malformed file", () => {
    expect(error(() => loadJobFile(join(dir, "missing.yaml")))).toMatch(/cannot read job file .*missing\.yaml/)
    expect(error(() => loadJobFile(file("bad.yaml", "job: [unclosed\n")))).toMatch(/neither JSON nor YAML/)
  })
})
