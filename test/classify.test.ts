// Checks: the classify task end to end below the actors and above them.
//   - The classify plan (actors/loader/tasks.ts): each row's label stays with its text
//     through the per-epoch shuffle, across loader shards (batch i served by shard i % n),
//     through the wire (encodeBatch/decodeBatch) and when a batch is cut again (a re-issued
//     lease is the same rows); the split and the tokenizer are deterministic; bad data
//     (one class only, a label neither class) is a clear error.
//   - `flotilla start` on the bundled SpamAssassin corpus with a small LSTM for a short run:
//     the validation accuracy beats always answering the majority class; the summary
//     (--json) reports valAccuracy and the other metrics; runs/<job>/split.json is written;
//     `flotilla classify <checkpoint> --json` labels texts with the trained model.
// Run: npx vitest run test/classify.test.ts   (~40-70 s on 2 cores: the training run)
import { spawnSync } from "node:child_process"
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll, describe, expect, it } from "vitest"
import { makePlanForJob } from "../actors/loader/tasks.ts"
import { decodeBatch, encodeBatch } from "../actors/loader/protocol.ts"
import { resolveJob } from "../shared/config/job.ts"
import { decode, tokenizerFromJson } from "../shared/data/tokenizer.ts"
import type { Batch } from "../shared/models/model.ts"
import type { BatchLeased } from "../shared/protocol/messages.ts"
import { loadClassifier } from "../cli/classify.ts"
import { tokenizerToJson } from "../shared/data/tokenizer.ts"

const loadClassifierTokenizer = async (ckpt: string) => tokenizerToJson((await loadClassifier(ckpt)).tokenizer)

const dirs: string[] = []
const tmp = () => {
  const d = mkdtempSync(join(tmpdir(), "flotilla-classify-"))
  dirs.push(d)
  return d
}
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true })
})

/** 90 texts; each starts with a word naming its class (alpha = ham, omega = spam), then filler. */
const corpus = (dir: string, labels: (i: number) => string = (i) => (i % 3 === 0 ? "spam" : "ham")): string => {
  const file = join(dir, "mail.jsonl")
  const filler = ["the", "a", "note", "call", "today", "please", "see", "more", "list", "item"]
  const lines = Array.from({ length: 90 }, (_, i) => {
    const label = labels(i)
    const head = label === "spam" ? "omega" : "alpha"
    const text = [head, ...Array.from({ length: 3 + (i % 7) }, (_, j) => filler[(i * 7 + j * 3) % filler.length]), `n${i}`].join(" ")
    return JSON.stringify({ text, label })
  })
  writeFileSync(file, lines.join("\n") + "\n")
  return file
}

const job = (file: string, patch: Record<string, unknown> = {}) =>
  resolveJob({
    job: "classify-plan",
    model: { kind: "lstm-classifier", vocabSize: 200, embedDim: 4, hidden: 4, dense: 3, maxLen: 6, maskPadding: true },
    data: { corpus: file, batchSize: 8, valFraction: 0.2, seed: 11 },
    ...patch
  })

/** Each row of a batch: (first word, label). */
const rows = (b: Batch, tokenizer: ReturnType<typeof tokenizerFromJson>): Array<[string, number]> => {
  const tokens = b.tensors.get("tokens") as Int32Array
  const labels = b.tensors.get("labels") as Float32Array
  const L = tokens.length / b.size
  return Array.from({ length: b.size }, (_, r) => [decode(tokenizer, tokens.subarray(r * L, (r + 1) * L)).split(" ")[0], labels[r]])
}

describe("the classify plan", () => {
  it("keeps every label with its text through shuffling, loader shards, the wire and re-cutting", () => {
    const plan = makePlanForJob(job(corpus(tmp())))
    const tok = tokenizerFromJson(plan.tokenizer)
    expect(plan.task).toBe("classify")
    expect(plan.labels).toEqual(["ham", "spam"])
    expect(plan.trainSamples + plan.valSamples).toBe(90)
    expect(plan.batchesPerEpoch).toBe(Math.floor(plan.trainSamples / 8))
    const seen: string[][] = []
    for (const epoch of [0, 1]) {
      const order: string[] = []
      // two loader shards: shard k serves the indices i with i % 2 === k; the batch is a function of (epoch, i) alone
      for (const shard of [0, 1]) {
        for (let i = shard; i < plan.batchesPerEpoch; i += 2) {
          const b = plan.trainBatch(epoch, i)
          for (const [head, y] of rows(b, tok)) {
            expect(head === "omega" ? 1 : head === "alpha" ? 0 : -1, `epoch ${epoch} batch ${i}: ${head} labelled ${y}`).toBe(y)
          }
          // through the wire, and cut again (a re-issued lease): the same rows and labels
          const meta = { _tag: "BatchLeased", v: 1, batchId: `e${epoch}-b${i}`, epoch, index: i, split: "train", B: 8, T: 6, attempt: 1, leaseMs: 1, gen: 1, epochBatches: plan.batchesPerEpoch } as BatchLeased
          const { data, headers } = encodeBatch(meta, b)
          const back = decodeBatch({ subject: "x", data, headers })
          if (back._tag !== "Batch") throw new Error(back.reason)
          expect(rows(back.batch, tok)).toEqual(rows(b, tok))
          expect(rows(plan.trainBatch(epoch, i), tok)).toEqual(rows(b, tok))
          order.push(...rows(b, tok).map(([, y], r) => `${i}:${r}:${y}`))
        }
      }
      seen.push(order)
    }
    // each epoch is shuffled anew
    expect(seen[0]).not.toEqual(seen[1])
    // validation: every val text once, in order, the last batch shorter, labels aligned
    const val = Array.from({ length: plan.valBatches }, (_, i) => plan.valBatch(i))
    expect(val.reduce((n, b) => n + b.size, 0)).toBe(plan.valSamples)
    for (const b of val) for (const [head, y] of rows(b, tok)) expect(head === "omega" ? 1 : 0).toBe(y)
  })

  it("is deterministic: the same split, tokenizer and batches from the same seed; another seed splits otherwise", () => {
    const file = corpus(tmp())
    const a = makePlanForJob(job(file))
    const b = makePlanForJob(job(file))
    expect(b.split).toEqual(a.split)
    expect(b.tokenizer).toEqual(a.tokenizer)
    expect(b.trainBatch(3, 2).tensors).toEqual(a.trainBatch(3, 2).tensors)
    const c = makePlanForJob(job(file, { data: { corpus: file, batchSize: 8, valFraction: 0.2, seed: 12 } }))
    expect((c.split as { val: string[] }).val).not.toEqual((a.split as { val: string[] }).val)
    // stratified: both classes in val in their proportion (30 spam, 60 ham; 20% each)
    expect((a.split as { counts: { val: Record<string, number> } }).counts.val).toEqual({ ham: 12, spam: 6 })
  })

  it("with data.labels: the declared order sets the ids; a label that is neither class is named with its line", () => {
    const file = corpus(tmp())
    const plan = makePlanForJob(job(file, { data: { corpus: file, batchSize: 8, valFraction: 0.2, labels: ["spam", "ham"] } }))
    expect(plan.labels).toEqual(["spam", "ham"])
    const tok = tokenizerFromJson(plan.tokenizer)
    for (const [head, y] of rows(plan.trainBatch(0, 0), tok)) expect(head === "omega" ? 0 : 1).toBe(y)
    const bad = corpus(tmp(), (i) => (i === 41 ? "hma" : i % 3 === 0 ? "spam" : "ham"))
    expect(() => makePlanForJob(job(bad, { data: { corpus: bad, batchSize: 8, labels: ["ham", "spam"] } }))).toThrow(/label "hma" at .*mail\.jsonl:42 is neither "ham" nor "spam"/)
  })

  it("refuses a corpus with one class, and a batch larger than the train split, saying why", () => {
    expect(() => makePlanForJob(job(corpus(tmp(), () => "ham")))).toThrow(/one class|only/i)
    expect(() => makePlanForJob(job(corpus(tmp()), { data: { corpus: corpus(tmp()), batchSize: 500, valFraction: 0.2 } }))).toThrow(/fewer than one batch of 500/)
  })
})

const BIN = join(import.meta.dirname, "..", "bin", "flotilla.ts")
const flotilla = (cwd: string, args: string[]) => spawnSync(process.execPath, [BIN, ...args], { cwd, encoding: "utf8", timeout: 240_000, env: { ...process.env, FLOTILLA_BACKEND: "wasm" } })

describe("flotilla start on spam-assassin, then flotilla classify", () => {
  it("a short run beats the majority class on validation; classify labels texts from the checkpoint", async () => {
    const cwd = tmp()
    writeFileSync(
      join(cwd, "job.yaml"),
      [
        "job: spam-short",
        "model: { kind: lstm-classifier, vocabSize: 4000, embedDim: 16, hidden: 16, dense: 16, maxLen: 60, maskPadding: true }",
        "data: { corpus: spam-assassin, batchSize: 32, valFraction: 0.2, seed: 7 }",
        "train: { steps: 120, evalEvery: 60, checkpointEvery: 0, clipNorm: 0 }",
        "optimizer: { kind: adam }",
        "schedule: { kind: constant, lr: 0.01 }"
      ].join("\n")
    )
    const run = flotilla(cwd, ["start", "job.yaml", "--json"])
    expect(run.status, run.stderr.slice(-3000)).toBe(0)
    const summary = JSON.parse(run.stdout.trim().split("\n").pop()!)
    const split = JSON.parse(readFileSync(join(cwd, "runs", "spam-short", "split.json"), "utf8"))
    const val = split.counts.val as Record<string, number>
    const majority = Math.max(val.ham, val.spam) / (val.ham + val.spam)
    console.info(`[classify] ${summary.steps} steps in ${summary.seconds.toFixed(1)} s: val accuracy ${summary.valAccuracy.toFixed(4)} vs majority ${majority.toFixed(4)}; ${JSON.stringify(summary.valMetrics)}`)
    expect(summary.steps).toBe(120)
    expect(summary.valAccuracy).toBeGreaterThan(majority + 0.05)
    for (const k of ["loss", "accuracy", "precision", "recall", "f1"]) expect(Number.isFinite(summary.valMetrics[k]), k).toBe(true)
    expect(summary.finalValLoss).toBeLessThan(summary.firstValLoss)

    const texts = join(cwd, "texts.txt")
    writeFileSync(texts, "the notes from the team meeting are attached\n\nFREE money!!! click here to claim your prize now\n")
    const c = flotilla(cwd, ["classify", summary.checkpoint, "--file", texts, "--json"])
    expect(c.status, c.stderr).toBe(0)
    const out = JSON.parse(c.stdout)
    expect(out.version).toBe(120)
    expect(out.predictions).toHaveLength(2)
    for (const p of out.predictions) {
      expect(["ham", "spam"]).toContain(p.label)
      expect(p.probability).toBeGreaterThanOrEqual(0.5)
      expect(p.probabilities.ham + p.probabilities.spam).toBeCloseTo(1, 5)
    }
    // plain output: one line per text, label first; a bad checkpoint path says what is wrong
    const plain = flotilla(cwd, ["classify", join(cwd, "checkpoints", "spam-short"), "hello there"])
    expect(plain.status, plain.stderr).toBe(0)
    expect(plain.stdout).toMatch(/^(ham|spam) +0\.\d{4} +hello there\n$/)
    const bad = flotilla(cwd, ["classify", join(cwd, "nope"), "x"])
    expect(bad.status).toBe(2)
    expect(bad.stderr).toMatch(/does not exist/)
    // fine-tuning from this checkpoint on other texts keeps its tokenizer (its embedding rows are those words)
    const other = corpus(tmp())
    const ft = makePlanForJob(resolveJob({
      job: "spam-ft", model: { kind: "lstm-classifier", vocabSize: 4000, embedDim: 16, hidden: 16, dense: 16, maxLen: 60 },
      data: { corpus: other, batchSize: 8 }, init: { from: join(cwd, "checkpoints", "spam-short") }
    }))
    expect(ft.tokenizer).toEqual(await loadClassifierTokenizer(join(cwd, "checkpoints", "spam-short")))
    expect(ft.describe).toMatch(/tokenizer from init\.from/)
    expect(() => makePlanForJob(resolveJob({
      job: "spam-ft2", model: { kind: "lstm-classifier", vocabSize: 5000, maxLen: 60 }, data: { corpus: other, batchSize: 8 }, init: { from: join(cwd, "checkpoints", "spam-short") }
    }))).toThrow(/its tokenizer has vocabSize 4000 and maxLen 60; the model says 5000 and 60/)
  }, 300_000)
})
