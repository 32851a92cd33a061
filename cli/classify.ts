/**
 * Implements: `flotilla classify <checkpoint> [text ...] [--file F] [--json]` — inference
 * with a trained classifier.
 *
 * <checkpoint> is a checkpoint file (`checkpoints/<job>/ps-0/v00007550.ckpt`) or a job's
 * checkpoint folder (`checkpoints/<job>`: the newest version every shard holds). A job
 * trained with several parameter-server shards keeps part of the params in each shard's
 * folder: every `ps-<k>` at that version is read and merged. Shard 0's checkpoint holds the
 * model block and the data info (class names and the word tokenizer fitted on the training
 * split, actors/param-server/checkpoint.ts `data`), so a text is tokenized exactly as in
 * training. Texts come from the command line, or one per line from --file (blank lines
 * skipped). Prints `label  probability  text` per text, or with --json one JSON array of
 * `{ text, label, probability, probabilities: { <class>: p } }`. <checkpoint> may also be a
 * quantized model file (`flotilla quantize`): it runs from its int8/int4 weights
 * (actors/quantizer/qforward.ts) with the tokenizer and class names the file carries.
 * Does not own: the model's maths (shared/models), the checkpoint layout.
 */
import { readFileSync } from "node:fs"
import * as tf from "@tensorflow/tfjs"
import { initBackend, type BackendPreference } from "../shared/compute/backend.ts"
import { encodeMany, tokenizerFromJson, type WordTokenizer } from "../shared/data/tokenizer.ts"
import { batchOf, checkParams, forward, toTensors, type Batch, type ModelDef } from "../shared/models/model.ts"
import { isQModelFile, readQModelFile } from "../actors/quantizer/qfile.ts"
import { qClassifierLogits } from "../actors/quantizer/qforward.ts"
import { loadTrained, type Trained } from "./export.ts"

export class ClassifyError extends Error {
  readonly _tag = "ClassifyError"
}

export interface Classifier {
  readonly model: ModelDef
  readonly labels: readonly string[]
  readonly tokenizer: WordTokenizer
  readonly params: Map<string, Float32Array>
  readonly version: number
  readonly job: string
  /** a quantized model file's forward (logits [B]); absent: the float params */
  readonly logits?: (batch: Batch) => Float32Array
}

/** A classifier from a quantized model file: its int8/int4 weights, tokenizer and class names. */
const loadQuantizedClassifier = (spec: string): Classifier => {
  let r: ReturnType<typeof readQModelFile>
  try {
    r = readQModelFile(spec)
  } catch (e) {
    throw new ClassifyError((e as Error).message)
  }
  const data = r.info.data as { labels?: unknown; tokenizer?: unknown } | undefined
  if (r.qm.def.task !== "classify") throw new ClassifyError(`${spec}: not a classifier (a quantized ${r.qm.def.kind})`)
  if (!Array.isArray(data?.labels) || data.labels.length !== 2 || data.tokenizer === undefined) throw new ClassifyError(`${spec}: the quantized model carries no class names or tokenizer`)
  let tokenizer: WordTokenizer
  try {
    tokenizer = tokenizerFromJson(data.tokenizer)
  } catch (e) {
    throw new ClassifyError(`${spec}: tokenizer: ${(e as Error).message}`)
  }
  return { model: r.qm.def, labels: data.labels as string[], tokenizer, params: new Map(), version: r.info.version, job: r.info.job, logits: (b) => qClassifierLogits(r.qm, b) }
}

/** Read and check a classifier from its checkpoint(s) (every shard merged: export.ts loadTrained). */
export const loadClassifier = async (spec: string): Promise<Classifier> => {
  if (isQModelFile(spec)) return loadQuantizedClassifier(spec)
  let t: Trained
  try {
    t = await loadTrained(spec)
  } catch (e) {
    throw new ClassifyError((e as Error).message)
  }
  const where = t.files[0]
  const data = t.first.data as { model?: { kind?: unknown }; labels?: unknown; tokenizer?: unknown }
  if (t.def.task !== "classify") throw new ClassifyError(`${where}: not a classifier checkpoint (model ${JSON.stringify(data.model?.kind)})`)
  if (!Array.isArray(data.labels) || data.labels.length !== 2 || data.tokenizer === undefined) {
    throw new ClassifyError(`${where}: the checkpoint has no class names or tokenizer (the loader did not answer data.info before it was written); use a later checkpoint`)
  }
  let tokenizer: WordTokenizer
  try {
    tokenizer = tokenizerFromJson(data.tokenizer)
  } catch (e) {
    throw new ClassifyError(`${where}: tokenizer: ${(e as Error).message}`)
  }
  try {
    checkParams(t.def, t.params)
  } catch (e) {
    throw new ClassifyError(`${spec}: ${(e as Error).message}`)
  }
  return { model: t.def, labels: data.labels as string[], tokenizer, params: t.params, version: t.version, job: t.first.job }
}

export interface Prediction {
  readonly text: string
  readonly label: string
  /** the probability of `label` */
  readonly probability: number
  readonly probabilities: Record<string, number>
}

/** P(class 1) for each text, in batches of 256. */
export const classify = (c: Classifier, texts: readonly string[]): Prediction[] => {
  const out: Prediction[] = []
  const named = c.logits ? new Map<string, tf.Tensor>() : toTensors(c.model, c.params)
  try {
    for (let i = 0; i < texts.length; i += 256) {
      const chunk = texts.slice(i, i + 256)
      const tokens = encodeMany(c.tokenizer, chunk)
      const batch = batchOf(chunk.length, { tokens, labels: new Float32Array(chunk.length) })
      const p1 = c.logits ? c.logits(batch).map((z) => 1 / (1 + Math.exp(-z))) : tf.tidy(() => tf.sigmoid(forward(c.model, named, batch)).dataSync())
      chunk.forEach((text, j) => {
        const p = p1[j]
        const k = p >= 0.5 ? 1 : 0
        out.push({ text, label: c.labels[k], probability: k === 1 ? p : 1 - p, probabilities: { [c.labels[0]]: 1 - p, [c.labels[1]]: p } })
      })
    }
  } finally {
    for (const t of named.values()) t.dispose()
  }
  return out
}

export const classifyMain = async (o: { checkpoint: string; texts: readonly string[]; file?: string; json: boolean; backend?: BackendPreference }): Promise<void> => {
  const texts = [...o.texts]
  if (o.file !== undefined) {
    let body: string
    try {
      body = readFileSync(o.file, "utf8")
    } catch (e) {
      throw new ClassifyError(`--file ${o.file}: ${(e as Error).message}`)
    }
    texts.push(...body.split(/\r?\n/).filter((l) => l.trim().length > 0))
  }
  if (texts.length === 0) throw new ClassifyError("nothing to classify: give texts after the checkpoint, or --file with one text per line")
  const c = await loadClassifier(o.checkpoint)
  await initBackend(o.backend)
  const preds = classify(c, texts)
  if (o.json) {
    process.stdout.write(JSON.stringify({ checkpoint: o.checkpoint, job: c.job, version: c.version, predictions: preds }) + "\n")
    return
  }
  const w = Math.max(...c.labels.map((l) => l.length))
  for (const p of preds) {
    const shown = p.text.replace(/\s+/g, " ").trim()
    process.stdout.write(`${p.label.padEnd(w)}  ${p.probability.toFixed(4)}  ${shown.length > 70 ? shown.slice(0, 67) + "..." : shown}\n`)
  }
}
