// Checks: the loader's batch plan — corpora (bundled, file, folder; empty, binary,
// unreadable, too small get a clear error) and deterministic batches. The lease table is
// test/loader.core.test.ts; the actor over NATS is test/loader.nats.test.ts.
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { describe, expect, it } from "vitest"
import { makeLmPlan, trainBatch, valBatch } from "../actors/loader/plan.ts"
import { CorpusError, decodeTokens, loadCorpus } from "../shared/data/corpus.ts"

const dir = mkdtempSync(join(tmpdir(), "flotilla-corpus-"))
const text = "It was the best of times, it was the worst of times. ".repeat(200)

describe("corpus", () => {
  it("reads the bundled Moby Dick, a file and a folder", () => {
    const moby = loadCorpus("moby-dick")
    expect(moby.bytes.length).toBeGreaterThan(1_000_000)
    expect(decodeTokens(moby.bytes.subarray(0, 200))).toMatch(/Call me Ishmael/)
    writeFileSync(join(dir, "a.txt"), text)
    expect(loadCorpus(join(dir, "a.txt")).bytes.length).toBe(text.length)
    mkdirSync(join(dir, "folder"))
    writeFileSync(join(dir, "folder", "1.txt"), "one")
    writeFileSync(join(dir, "folder", "2.md"), "two")
    writeFileSync(join(dir, "folder", "skip.bin"), "zzz")
    expect(decodeTokens(loadCorpus(join(dir, "folder")).bytes)).toBe("one\n\ntwo\n\n")
  })

  it("rejects empty, binary, non-UTF-8, unreadable and too-small corpora with a clear error", () => {
    writeFileSync(join(dir, "empty.txt"), "")
    writeFileSync(join(dir, "bin.dat"), Buffer.from([1, 2, 0, 3]))
    writeFileSync(join(dir, "latin1.txt"), Buffer.from([0x63, 0x61, 0x66, 0xe9, 0x20, 0x41]))
    mkdirSync(join(dir, "nothing"))
    const cases: Array<[string, RegExp]> = [
      [join(dir, "empty.txt"), /is empty/],
      [join(dir, "bin.dat"), /looks binary/],
      [join(dir, "latin1.txt"), /not valid UTF-8/],
      [join(dir, "does-not-exist.txt"), /unreadable.*bundled corpora: moby-dick/],
      [join(dir, "nothing"), /no \.txt or \.md files/]
    ]
    for (const [path, re] of cases) expect(() => loadCorpus(path)).toThrow(re)
    expect(() => loadCorpus(join(dir, "empty.txt"))).toThrow(CorpusError)
    expect(() => makeLmPlan(new TextEncoder().encode("tiny"), { T: 16, B: 4, valFraction: 0.1, seed: 1, valBatches: 1 })).toThrow(/too small/)
  })
})

describe("batch plan", () => {
  const bytes = loadCorpus("moby-dick").bytes.subarray(0, 20_000) // varied text: windows differ
  const plan = makeLmPlan(bytes, { T: 16, B: 4, valFraction: 0.1, seed: 7, valBatches: 2 })

  it("cuts B windows of T+1 tokens, the same for the same seed, shuffled per epoch", () => {
    const b = trainBatch(plan, 0, 3)
    expect(b.length).toBe(4 * 17)
    expect(trainBatch(plan, 0, 3)).toEqual(b)
    expect(trainBatch(makeLmPlan(bytes, { ...plan, seed: 7 }), 0, 3)).toEqual(b)
    expect(trainBatch(plan, 1, 3)).not.toEqual(b)
    expect(trainBatch(makeLmPlan(bytes, { ...plan, seed: 8 }), 0, 3)).not.toEqual(b)
    // every window is a contiguous slice of the train split
    const row = Array.from(b.subarray(0, 17))
    const s = Buffer.from(plan.train).indexOf(Buffer.from(row))
    expect(s).toBeGreaterThanOrEqual(0)
    // an epoch covers each window at most once
    const starts = new Set<string>()
    for (let i = 0; i < plan.batchesPerEpoch; i++) {
      const t = trainBatch(plan, 0, i)
      for (let r = 0; r < 4; r++) starts.add(Array.from(t.subarray(r * 17, r * 17 + 17)).join(","))
    }
    expect(starts.size).toBe(plan.batchesPerEpoch * 4)
    expect(valBatch(plan, 1).length).toBe(4 * 17)
  })
})
