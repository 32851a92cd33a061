/**
 * Implements: the loader's plan per task — how a corpus becomes the batches a model eats.
 *
 *   lm        byte-level windows of a text corpus (plan.ts): tokens [B, T+1].
 *   classify  a labelled corpus (shared/data/labelled.ts), split stratified and seeded into
 *             train/val, a word tokenizer fitted on the train texts (shared/data/tokenizer.ts;
 *             a job fine-tuned from a classifier checkpoint keeps that checkpoint's tokenizer),
 *             every text encoded once to maxLen ids: tokens [B, maxLen] int32, labels [B]
 *             float32. Train rows are shuffled per epoch by a seeded permutation (the same
 *             on every host and restart); an epoch is ⌊train / B⌋ batches (the few rows past
 *             the last full batch wait for another epoch's shuffle). Validation is the whole
 *             val split in order, in batches of B (the last one shorter).
 * The task comes from the model (ModelDef.task); the batch's names, dtypes and shapes are
 * the model's batch spec (checked here once per plan). A DataPlan is pure after it is made:
 * batch (epoch, index) is a function of the corpus, the seed and the config.
 * Does not own: the lease table (core.ts), the wire form (protocol.ts), reading corpora.
 */
import type { JobConfig } from "../../shared/config/job.ts"
import { CorpusError, loadCorpus } from "../../shared/data/corpus.ts"
import { loadLabelled, splitRecord, stratifiedSplit } from "../../shared/data/labelled.ts"
import { encodeMany, fitTokenizer, tokenizerFromJson, tokenizerToJson, type WordTokenizer } from "../../shared/data/tokenizer.ts"
import { readFileSync } from "node:fs"
import { decodeCheckpoint } from "../param-server/checkpoint.ts"
import { resolveCheckpointFiles } from "../param-server/init.ts"
import { gptBatch } from "../../shared/models/gpt.ts"
import { lstmBatch } from "../../shared/models/lstm-classifier.ts"
import { batchProblem, type Batch, type ModelDef, type Task } from "../../shared/models/model.ts"
import { makeModel } from "../../shared/models/zoo.ts"
import { epochPermutations, makeLmPlan, trainBatch as lmTrainBatch, valBatch as lmValBatch } from "./plan.ts"

export interface DataPlan {
  readonly task: Task
  readonly model: ModelDef
  /** rows per batch */
  readonly B: number
  /** LM: tokens per row predicted (T); classify: maxLen */
  readonly T: number
  readonly batchesPerEpoch: number
  /** validation batches there are (0: no validation) */
  readonly valBatches: number
  readonly trainSamples: number
  readonly valSamples: number
  /** one line for the log */
  readonly describe: string
  trainBatch(epoch: number, index: number): Batch
  valBatch(index: number): Batch
  /** classify: class names and the tokenizer's JSON; the split record for runs/<job>/split.json */
  readonly labels?: readonly string[]
  readonly tokenizer?: unknown
  readonly split?: unknown
}

const checked = (model: ModelDef, b: Batch, what: string): Batch => {
  const p = batchProblem(model, b)
  if (p !== undefined) throw new CorpusError(`${what}: ${p}`)
  return b
}

const lmPlan = (job: JobConfig, model: ModelDef): DataPlan => {
  if (job.model.kind !== "gpt") throw new CorpusError(`the lm plan needs a gpt model, got ${job.model.kind}`)
  const corpus = loadCorpus(job.data.corpus)
  const plan = makeLmPlan(corpus.bytes, { T: job.model.contextLength, B: job.data.batchSize, valFraction: job.data.valFraction, seed: job.data.seed, valBatches: job.data.valBatches })
  const valBatches = job.data.valFraction > 0 ? job.data.valBatches : 0
  const out: DataPlan = {
    task: "lm",
    model,
    B: plan.B,
    T: plan.T,
    batchesPerEpoch: plan.batchesPerEpoch,
    valBatches,
    trainSamples: plan.trainWindows,
    valSamples: valBatches * plan.B,
    describe: `corpus ${job.data.corpus}, ${plan.train.length} train / ${plan.val.length} val bytes, ${plan.batchesPerEpoch} batches of ${plan.B}×${plan.T + 1} per epoch`,
    trainBatch: (e, i) => gptBatch(lmTrainBatch(plan, e, i), plan.B),
    valBatch: (i) => gptBatch(lmValBatch(plan, i), plan.B)
  }
  checked(model, out.trainBatch(0, 0), "lm plan")
  return out
}

/** The tokenizer in shard 0's checkpoint of `init.from` (a checkpoint file or folder), if it has one. */
const inheritedTokenizer = (job: JobConfig): WordTokenizer | undefined => {
  const from = job.init?.from
  if (from === undefined || from.startsWith("store:") || from.endsWith(".safetensors")) return undefined
  const { files } = resolveCheckpointFiles(from)
  const data = decodeCheckpoint(new Uint8Array(readFileSync(files[0])), files[0]).data as { tokenizer?: unknown } | undefined
  return data?.tokenizer === undefined ? undefined : tokenizerFromJson(data.tokenizer)
}

const classifyPlan = (job: JobConfig, model: ModelDef): DataPlan => {
  if (job.model.kind !== "lstm-classifier") throw new CorpusError(`the classify plan needs a classifier model, got ${job.model.kind}`)
  const { maxLen, vocabSize } = job.model
  const B = job.data.batchSize
  const corpus = loadLabelled(job.data.corpus, job.data.labels)
  const split = stratifiedSplit(corpus.y, job.data.valFraction, job.data.seed)
  const nTrain = split.train.length
  const batchesPerEpoch = Math.floor(nTrain / B)
  if (batchesPerEpoch < 1) {
    throw new CorpusError(`corpus ${job.data.corpus}: its train split has ${nTrain} texts, fewer than one batch of ${B}; lower data.batchSize or give more data`)
  }
  // a classifier fine-tuned from a classifier's checkpoint keeps that checkpoint's words:
  // its embedding rows are those words (a tokenizer fitted anew would give them other ids)
  const inherited = inheritedTokenizer(job)
  if (inherited && (inherited.vocabSize !== vocabSize || inherited.maxLen !== maxLen)) {
    throw new CorpusError(`init.from ${job.init!.from}: its tokenizer has vocabSize ${inherited.vocabSize} and maxLen ${inherited.maxLen}; the model says ${vocabSize} and ${maxLen}`)
  }
  const tokenizer = inherited ?? fitTokenizer(split.train.map((i) => corpus.texts[i]), vocabSize, maxLen)
  const ids = encodeMany(tokenizer, corpus.texts as string[]) // [n, maxLen]
  const rows = (which: readonly number[]): Batch => {
    const tokens = new Int32Array(which.length * maxLen)
    const labels = new Float32Array(which.length)
    which.forEach((r, b) => {
      tokens.set(ids.subarray(r * maxLen, (r + 1) * maxLen), b * maxLen)
      labels[b] = corpus.y[r]
    })
    return lstmBatch(tokens, labels)
  }
  const permOf = epochPermutations(nTrain, job.data.seed)
  const nVal = split.val.length
  const valBatches = nVal === 0 ? 0 : Math.ceil(nVal / B)
  const count = (idx: readonly number[], label: number) => idx.filter((i) => corpus.y[i] === label).length
  const out: DataPlan = {
    task: "classify",
    model,
    B,
    T: maxLen,
    batchesPerEpoch,
    valBatches,
    trainSamples: nTrain,
    valSamples: nVal,
    describe:
      `corpus ${corpus.name}: ${corpus.texts.length} texts (${corpus.labels.map((l, k) => `${count(split.train, k) + count(split.val, k)} ${l}`).join(", ")}), ` +
      `${nTrain} train / ${nVal} val, vocabulary ${tokenizer.words.length + 2} of ${vocabSize}, ${batchesPerEpoch} batches of ${B}×${maxLen} per epoch; ` +
      (inherited
        ? `tokenizer from init.from ${job.init!.from}`
        : job.init?.from.startsWith("store:")
          ? `tokenizer fitted anew: its word ids need not match the weights of init.from ${job.init.from} (give that job's checkpoint folder to keep its tokenizer)`
          : "tokenizer fitted on the train split"),
    trainBatch: (epoch, index) => {
      if (index < 0 || index >= batchesPerEpoch) throw new RangeError(`batch index ${index} out of range`)
      const p = permOf(epoch)
      return rows(Array.from(p.subarray(index * B, (index + 1) * B), (k) => split.train[k]))
    },
    valBatch: (index) => {
      if (index < 0 || index >= valBatches) throw new RangeError(`val batch ${index} out of range (there are ${valBatches})`)
      return rows(split.val.slice(index * B, (index + 1) * B))
    },
    labels: corpus.labels,
    tokenizer: tokenizerToJson(tokenizer),
    split: splitRecord(corpus, split, { seed: job.data.seed, valFraction: job.data.valFraction })
  }
  checked(model, out.trainBatch(0, 0), "classify plan")
  return out
}

/** The plan for a job's model and data. Throws a CorpusError / LabelledDataError that says what is wrong. */
export const makePlanForJob = (job: JobConfig): DataPlan => {
  const model = makeModel(job.model)
  switch (model.task) {
    case "lm":
      return lmPlan(job, model)
    case "classify":
      return classifyPlan(job, model)
  }
}
