/**
 * Implements: post-training quantization of a trained checkpoint — `quantizeCheckpoint(req)`,
 * the one function `flotilla quantize` runs in-process and the quantizer's NATS handler
 * (service.ts) runs for a request: read the checkpoint (every shard merged, a LoRA job's
 * adapters folded in), quantize its weights (qmodel.ts), calibrate activation ranges on
 * training batches (int8-static), write the quantized model file (qfile.ts), read it back,
 * and evaluate the float model and the read-back quantized one on the job's validation
 * batches (the loader's plan, actors/loader/tasks.ts). The report says sizes, losses and,
 * for a classifier, accuracies.
 * Does not own: quantizing or running tensors (qmodel.ts, qforward.ts), the file layout
 * (qfile.ts), the checkpoint format (actors/param-server), the data (actors/loader, shared/data).
 *
 * Which job's data: a checkpoint names its job and model, not its data block, so the
 * validation split is rebuilt from the first of: `jobFile` (--job), `runs/<job>/job.json`
 * (written by `flotilla up`), `jobs/<job>.yaml|.yml|.json`, whose model matches the
 * checkpoint's; else the default data block with the checkpoint's corpus (the report's
 * `jobSource` says which). A classifier is evaluated with the checkpoint's own tokenizer.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs"
import { dirname, join } from "node:path"
import * as tf from "@tensorflow/tfjs"
import { Data, Effect } from "effect"
import { makePlanForJob, type DataPlan } from "../loader/tasks.ts"
import { loadTrained, type Trained } from "../../cli/export.ts"
import { Compute } from "../../shared/compute/backend.ts"
import { loadJobFile, resolveJob, type GptModel, type JobConfig, type LstmModel } from "../../shared/config/job.ts"
import type { GptConfig } from "../../shared/models/gpt.ts"
import { mergeLora } from "../../shared/models/lora.ts"
import { addSums, countParams, scoreBatch, sizeOf, type ModelDef } from "../../shared/models/model.ts"
import { makeModel } from "../../shared/models/zoo.ts"
import { decodeQModel, encodeQModel } from "./qfile.ts"
import { qForward, qScore } from "./qforward.ts"
import { DEFAULT_GROUP, isQuantMode, QUANT_MODES, quantizeModel, type QModel, type QuantMode } from "./qmodel.ts"

/** Defaults, in one place. */
export const DEFAULT_CALIB_BATCHES = 8 // int8-static: training batches whose activation absmax fixes the scales
const MAX_CALIB_BATCHES = 10_000

export interface QuantizeRequest {
  /** a checkpoint file or a job's checkpoint folder (actors/param-server/init.ts) */
  readonly checkpoint: string
  readonly mode: QuantMode
  /** int8-static: training batches to calibrate on (default DEFAULT_CALIB_BATCHES) */
  readonly calibBatches?: number
  /** the file to write (default defaultOut(checkpoint, mode)) */
  readonly out?: string
  /** the job file whose data block to evaluate on (default: found from the checkpoint's job, see the top) */
  readonly jobFile?: string
  /** int4-weight: values per scale along the input dim (default DEFAULT_GROUP) */
  readonly groupSize?: number
}

export interface QuantizeReport {
  readonly checkpoint: string
  readonly job: string
  readonly version: number
  readonly model: string
  readonly mode: QuantMode
  readonly out: string
  /** where the validation data's job config came from */
  readonly jobSource: string
  readonly params: number
  /** 4 bytes a param */
  readonly fp32Bytes: number
  /** the quantized file's size */
  readonly quantBytes: number
  /** fp32Bytes / quantBytes */
  readonly sizeRatio: number
  /** of quantBytes, the prefix and JSON header (a classifier's tokenizer is most of it) */
  readonly headerBytes: number
  /** the quantized tensors alone: float32 bytes, their int8/int4 bytes plus scales, and the ratio */
  readonly weightFp32Bytes: number
  readonly weightQuantBytes: number
  readonly weightSizeRatio: number
  readonly tensors: { readonly int8: number; readonly int4: number; readonly float32: number }
  readonly groupSize: number
  readonly calibBatches: number
  readonly valBatches: number
  readonly valSamples: number
  readonly fp32ValLoss: number
  readonly quantValLoss: number
  /** quant − fp32 */
  readonly lossDelta: number
  /** lossDelta / fp32ValLoss */
  readonly lossDeltaRel: number
  readonly fp32Accuracy?: number
  readonly quantAccuracy?: number
  /** quant − fp32 */
  readonly accuracyDelta?: number
  readonly fp32Metrics: Record<string, number>
  readonly quantMetrics: Record<string, number>
  readonly seconds: number
}

/** invalid-request: a bad field; checkpoint: unreadable or not a model; data: its validation data cannot be rebuilt; quantize: quantizing or running it failed; write: the file cannot be written or read back; bad-reply: (a client) a quantizer answered something undecodable. */
export const QUANTIZE_FAILURES = ["invalid-request", "checkpoint", "data", "quantize", "write", "bad-reply"] as const
export type QuantizeFailure = (typeof QUANTIZE_FAILURES)[number]

export class QuantizeError extends Data.TaggedError("QuantizeError")<{ readonly reason: QuantizeFailure; readonly message: string }> {}

export type Progress = (line: string) => void

const SUFFIX: Record<QuantMode, string> = { "int8-dynamic": "int8-dynamic", "int8-static": "int8-static", "int4-weight": "int4" }

/** `<checkpoint without .ckpt or a trailing />.<mode>.qmodel`: checkpoints/gpt-mini → checkpoints/gpt-mini.int8-dynamic.qmodel. */
export const defaultOut = (checkpoint: string, mode: QuantMode): string => `${checkpoint.replace(/\/+$/, "").replace(/\.ckpt$/, "")}.${SUFFIX[mode]}.qmodel`

const fail = (reason: QuantizeFailure, message: string) => new QuantizeError({ reason, message })
const message = (e: unknown) => (e instanceof Error ? e.message : String(e))
const attempt = <A>(reason: QuantizeFailure, f: () => A): Effect.Effect<A, QuantizeError> => Effect.try({ try: f, catch: (e) => fail(reason, message(e)) })

/** The request with its defaults, or why it is bad. */
export const checkRequest = (req: QuantizeRequest): Effect.Effect<Required<Omit<QuantizeRequest, "jobFile">> & Pick<QuantizeRequest, "jobFile">, QuantizeError> =>
  Effect.suspend(() => {
    if (typeof req.checkpoint !== "string" || req.checkpoint.length === 0) return Effect.fail(fail("invalid-request", "checkpoint: give a checkpoint file or a job's checkpoint folder"))
    if (!isQuantMode(req.mode)) return Effect.fail(fail("invalid-request", `mode must be one of ${QUANT_MODES.join(", ")}, got ${JSON.stringify(req.mode)}`))
    const calib = req.calibBatches ?? DEFAULT_CALIB_BATCHES
    if (!Number.isInteger(calib) || calib < 1 || calib > MAX_CALIB_BATCHES) return Effect.fail(fail("invalid-request", `calibBatches must be an integer in [1, ${MAX_CALIB_BATCHES}], got ${JSON.stringify(req.calibBatches)}`))
    const group = req.groupSize ?? DEFAULT_GROUP
    if (!Number.isInteger(group) || group < 1) return Effect.fail(fail("invalid-request", `groupSize must be a positive integer, got ${JSON.stringify(req.groupSize)}`))
    if (req.out !== undefined && (typeof req.out !== "string" || req.out.length === 0)) return Effect.fail(fail("invalid-request", "out: give a file path"))
    return Effect.succeed({ checkpoint: req.checkpoint, mode: req.mode, calibBatches: calib, groupSize: group, out: req.out ?? defaultOut(req.checkpoint, req.mode), jobFile: req.jobFile })
  })

/** The float model a checkpoint holds: its model block, and a LoRA job's adapters merged into the base. */
export const floatModel = (t: Trained): { def: ModelDef; model: GptModel | LstmModel; params: Map<string, Float32Array> } => {
  const block = (t.first.data as { model?: GptModel | LstmModel } | undefined)?.model
  if (block === undefined) throw new Error(`${t.files[0]}: the checkpoint does not name its model`)
  const params = t.lora ? mergeLora(t.def.config as GptConfig, t.params) : t.params
  const def = t.lora ? makeModel(block) : t.def // `block` is the job's model without train.lora: the base
  return { def, model: block, params: new Map(def.specs.map((s) => [s.name, params.get(s.name)!])) }
}

const canonical = (x: unknown): string => JSON.stringify(x, (_k, v) => (v && typeof v === "object" && !Array.isArray(v) ? Object.fromEntries(Object.entries(v).sort(([a], [b]) => a.localeCompare(b))) : v))

/** The job whose data block rebuilds the checkpoint's validation split (see the top of this file). */
export const jobForData = (name: string, model: GptModel | LstmModel, corpus: string | undefined, jobFile?: string): { job: JobConfig; source: string } => {
  if (jobFile !== undefined) {
    const j = loadJobFile(jobFile)
    if (canonical(j.model) !== canonical(model)) throw new Error(`--job ${jobFile}: its model ${canonical(j.model)} is not the checkpoint's ${canonical(model)}`)
    return { job: j, source: jobFile }
  }
  for (const f of [join("runs", name, "job.json"), ...["yaml", "yml", "json"].map((x) => join("jobs", `${name}.${x}`))]) {
    if (!existsSync(f)) continue
    let j: JobConfig
    try {
      j = loadJobFile(f)
    } catch {
      continue
    }
    if (j.job === name && canonical(j.model) === canonical(model)) return { job: j, source: f }
  }
  return { job: resolveJob({ job: name, model, ...(corpus ? { data: { corpus } } : {}) }), source: `defaults (shared/config/job.ts data block${corpus ? `, corpus ${corpus} from the checkpoint` : ""}; give --job FILE for the job's own)` }
}

/** Training batch i of the plan's order (epoch 0 first). */
const trainBatchAt = (plan: DataPlan, i: number) => plan.trainBatch(Math.floor(i / plan.batchesPerEpoch), i % plan.batchesPerEpoch)

/** int8-static: the absmax of each activation site over `n` training batches (weights as quantized). */
export const calibrate = (qm: QModel, plan: DataPlan, n: number): Record<string, number> => {
  const ranges = new Map<string, number>()
  for (let i = 0; i < n; i++) tf.tidy(() => void qForward(qm, { kind: "observe", ranges }, trainBatchAt(plan, i)))
  return Object.fromEntries(ranges)
}

const evaluate = (plan: DataPlan, score: (i: number) => Record<string, number>, summarize: ModelDef["summarize"]) => {
  const sums: Record<string, number> = {}
  for (let i = 0; i < plan.valBatches; i++) addSums(sums, score(i))
  return summarize(sums)
}

/**
 * Quantize a checkpoint, write the quantized model file and evaluate it against the float
 * model on the job's validation batches. Synchronous compute inside (tfjs): a long request
 * holds its fiber's thread for its whole run (seconds to minutes).
 */
export const quantizeCheckpoint = Effect.fn("Quantizer.quantize")(function* (req: QuantizeRequest, progress: Progress = () => {}) {
  const started = Date.now()
  yield* Compute // the backend is initialised (tfjs is process-global)
  const r = yield* checkRequest(req)
  const t = yield* Effect.tryPromise({ try: () => loadTrained(r.checkpoint), catch: (e) => fail("checkpoint", message(e)) })
  const { def, model, params } = yield* attempt("checkpoint", () => floatModel(t))
  const data = (t.first.data ?? {}) as { corpus?: string; labels?: unknown; tokenizer?: unknown; task?: string }
  if (def.task === "classify" && (data.tokenizer === undefined || !Array.isArray(data.labels))) {
    return yield* Effect.fail(fail("checkpoint", `${t.files[0]}: the classifier checkpoint has no class names or tokenizer (the loader did not answer before it was written); use a later checkpoint`))
  }
  const { job, source } = yield* attempt("data", () => jobForData(t.first.job, model, data.corpus, r.jobFile))
  progress(`quantize: ${r.checkpoint} (job ${t.first.job}, version ${t.version}, ${def.kind}, ${countParams(def).toLocaleString("en")} params) → ${r.mode}; data from ${source}`)
  // a classifier keeps the checkpoint's tokenizer: its embedding rows are those words
  const plan = yield* attempt("data", () => makePlanForJob({ ...job, model, train: { ...job.train, lora: undefined }, init: def.task === "classify" ? { from: r.checkpoint } : undefined }))
  if (plan.valBatches === 0) return yield* Effect.fail(fail("data", `job ${job.job} has no validation split (data.valFraction is 0): nothing to evaluate the quantized model on`))
  let qm = yield* attempt("quantize", () => quantizeModel(def, model, params, r.mode, r.groupSize))
  if (r.mode === "int8-static") {
    progress(`quantize: calibrating activation ranges on ${r.calibBatches} training batches`)
    const ranges = yield* attempt("quantize", () => calibrate(qm, plan, r.calibBatches))
    qm = { ...qm, activations: ranges }
  }
  const info = { job: t.first.job, version: t.version, source: r.checkpoint, groupSize: r.groupSize, data: def.task === "classify" ? { task: data.task, corpus: data.corpus, labels: data.labels, tokenizer: data.tokenizer } : { task: "lm", corpus: data.corpus } }
  const bytes = yield* attempt("write", () => encodeQModel(qm, info))
  yield* attempt("write", () => {
    mkdirSync(dirname(r.out), { recursive: true })
    writeFileSync(r.out, bytes)
  })
  // evaluate what was written: the file read back, so the numbers are the file's
  const { qm: back, header } = yield* attempt("write", () => decodeQModel(new Uint8Array(readFileSync(r.out)), r.out))
  progress(`quantize: wrote ${r.out} (${bytes.length.toLocaleString("en")} bytes); evaluating fp32 and ${r.mode} on ${plan.valBatches} validation batches`)
  // the same batches for both, cut once
  const val = yield* attempt("data", () => Array.from({ length: plan.valBatches }, (_, i) => plan.valBatch(i)))
  const fp32 = yield* attempt("data", () => evaluate(plan, (i) => scoreBatch(def, params, val[i]), def.summarize))
  const quant = yield* attempt("quantize", () => evaluate(plan, (i) => qScore(back, val[i]), def.summarize))
  const counts = { int8: 0, int4: 0, float32: 0 }
  let wf = 0
  let wq = 0
  for (const q of back.tensors.values()) {
    counts[q.dtype]++
    if (q.dtype === "float32") continue
    wf += 4 * sizeOf(q.shape)
    wq += q.data.byteLength + 4 * q.scales!.length
  }
  const fp32Bytes = 4 * countParams(def)
  const classify = def.task === "classify"
  const report: QuantizeReport = {
    checkpoint: r.checkpoint, job: t.first.job, version: t.version, model: def.kind, mode: r.mode, out: r.out, jobSource: source,
    params: countParams(def), fp32Bytes, quantBytes: bytes.length, sizeRatio: fp32Bytes / bytes.length, headerBytes: bytes.length - header.payloadBytes,
    weightFp32Bytes: wf, weightQuantBytes: wq, weightSizeRatio: wq > 0 ? wf / wq : 1, tensors: counts,
    groupSize: r.groupSize, calibBatches: r.mode === "int8-static" ? r.calibBatches : 0,
    valBatches: plan.valBatches, valSamples: plan.valSamples,
    fp32ValLoss: fp32.loss, quantValLoss: quant.loss, lossDelta: quant.loss - fp32.loss, lossDeltaRel: (quant.loss - fp32.loss) / fp32.loss,
    ...(classify ? { fp32Accuracy: fp32.accuracy, quantAccuracy: quant.accuracy, accuracyDelta: quant.accuracy - fp32.accuracy } : {}),
    fp32Metrics: fp32, quantMetrics: quant, seconds: (Date.now() - started) / 1000
  }
  return report
})
