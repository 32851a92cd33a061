// Implements: one codec's training run for bench/compression.ts (section 1), in its own
// process so two codecs train at once on 2 cores. Data parallelism simulated in-process
// along the real wire path, step by step:
//   2 workers, each: lossAndGrads on its own batch (shared/models/model.ts) → every
//   trainable tensor through its own GradEncoder (shared/wire/compression.ts: the worker's
//   encoding rules — error-feedback residual per worker and tensor, small tensors f32,
//   f32 embedding grads as sparse rows) → encodeBundle (shared/wire/tensor.ts) + the
//   manifest as header JSON;
//   the "server": decodeBundle → denseOfWire (shared/wire/rows.ts: decodeTensor, then denseGrads)
//   (rows.ts) → ShardState.admit / choose / apply (actors/param-server/aggregate.ts: the
//   sample-weighted mean, global-norm clipping and the job's optimizer, as a sync PS does),
//   with the LR the scheduler would give version v (lrAt(schedule, v)).
// Worker w takes train batch 2v + w of epoch 0 at version v, so every codec sees the same
// batches from the same init. Measures payload bytes per step, encode / decode ms per
// gradient, the train loss per version and the mean validation loss over the first
// --val-batches validation batches at the end.
//   node bench/compression-train.ts --codec int8 [--steps 300] [--batch 8] [--seq 64]
//        [--val-batches 8] [--min-elements N] [--job jobs/gpt-mini.yaml]
// Prints progress to stderr; the result as JSON on stdout, or over IPC when forked.
// Owns nothing but measurement.
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { parseArgs } from "node:util"
import { Result } from "effect"
import { ShardState, type Held } from "../actors/param-server/aggregate.ts"
import { makeLmPlan, trainBatch, valBatch } from "../actors/loader/plan.ts"
import { initBackend } from "../shared/compute/backend.ts"
import { loadJobFile } from "../shared/config/job.ts"
import { loadCorpus } from "../shared/data/corpus.ts"
import { gptBatch } from "../shared/models/gpt.ts"
import { evalLoss, lossAndGrads } from "../shared/models/model.ts"
import { makeModel } from "../shared/models/zoo.ts"
import { resolveOptimizer } from "../shared/optim/optimizers.ts"
import { batchId } from "../shared/protocol/applied-log.ts"
import { lrAt, resolveSchedule, type ScheduleInput } from "../shared/schedule/schedules.ts"
import { GradEncoder, specOf } from "../shared/wire/compression.ts"
import { denseOfWire } from "../shared/wire/rows.ts"
import { decodeBundle, encodeBundle, manifestToJson, type TensorBundle, type WireTensor } from "../shared/wire/tensor.ts"
import { median } from "./stats.ts"

export interface TrainResult {
  readonly codec: string
  readonly steps: number
  /** payload bytes of both workers' gradient bundles, mean per version. */
  readonly bytesPerStep: number
  /** the manifests' JSON (the Flotilla-Manifest header), both workers, mean per version. */
  readonly manifestBytesPerStep: number
  /** sample-weighted mean train loss of each version's two batches. */
  readonly trainLoss: number[]
  readonly valLoss: number
  /** medians per gradient (one worker's): GradEncoder + encodeBundle + manifest JSON; decodeBundle + decodeTensor + denseGrads. */
  readonly encodeMs: number
  readonly decodeMs: number
  /** gradients the server refused (non-finite, bad tensor): the version then used the other one. */
  readonly refused: number
  readonly wallS: number
}

export interface TrainArgs {
  readonly codec: string
  readonly steps: number
  readonly batch: number
  readonly seq: number
  readonly valBatches: number
  readonly minElements?: number
  readonly job: string
}

const here = dirname(fileURLToPath(import.meta.url))
export const DEFAULT_JOB_FILE = join(here, "..", "jobs", "gpt-mini.yaml")
const WORKERS = 2

export const train = async (a: TrainArgs, progress: (line: string) => void = () => {}): Promise<TrainResult> => {
  const t0 = performance.now()
  await initBackend("wasm")
  const job = loadJobFile(a.job)
  const def = makeModel(job.model)
  const codec = specOf(a.codec)
  const opt = resolveOptimizer(job.optimizer as never)
  const sched = resolveSchedule(job.schedule as unknown as ScheduleInput)
  if (Result.isFailure(opt) || Result.isFailure(sched)) throw new Error(`${a.job}: optimizer or schedule does not resolve`)
  const corpus = loadCorpus(job.data.corpus)
  const plan = makeLmPlan(corpus.bytes, { T: a.seq, B: a.batch, valFraction: job.data.valFraction, seed: job.data.seed, valBatches: a.valBatches })
  if (WORKERS * a.steps > plan.batchesPerEpoch) throw new Error(`${a.steps} steps × ${WORKERS} workers need more than one epoch (${plan.batchesPerEpoch} batches)`)
  const shapes = new Map(def.specs.map((s) => [s.name, s.shape]))
  const server = new ShardState({ specs: def.specs, params: def.init(job.train.seed), optimizer: opt.success, consistency: { mode: "sync" }, clipNorm: job.train.clipNorm })
  const minElements = a.minElements ?? job.train.compression.minElements
  const encoders = Array.from({ length: WORKERS }, () => new GradEncoder(minElements))
  const senders = encoders.map((_, w) => `worker-${w}`)

  const trainLoss: number[] = []
  const encodeMs: number[] = []
  const decodeMs: number[] = []
  let bytes = 0
  let manifestBytes = 0
  let refused = 0
  const tLoop = performance.now()
  for (let v = 0; v < a.steps; v++) {
    // every worker computes on the same params (version v), then pushes
    const params = server.params
    for (let w = 0; w < WORKERS; w++) {
      const index = WORKERS * v + w
      const batch = gptBatch(trainBatch(plan, 0, index), plan.B)
      const { loss, grads } = lossAndGrads(def, params, batch)
      // ---- worker w: encode under the codec, lay the bundle out
      const e0 = performance.now()
      const tensors: WireTensor[] = def.specs.flatMap((sp) => encoders[w].encode(codec, sp.name, sp.shape, grads.get(sp.name)!))
      const bundle: TensorBundle = { tensors, meta: { kind: "grads", job: job.job, version: v, step: v, sender: senders[w], batchId: batchId(0, index), codec: a.codec } }
      const enc = encodeBundle(bundle)
      if (Result.isFailure(enc)) throw new Error(`${a.codec}: encodeBundle: ${enc.failure.message}`)
      const header = manifestToJson(enc.success.manifest)
      encodeMs.push(performance.now() - e0)
      bytes += enc.success.payload.length
      manifestBytes += header.length
      // ---- server: decode, densify, admit
      const d0 = performance.now()
      const dec = decodeBundle(header, enc.success.payload)
      if (Result.isFailure(dec)) throw new Error(`${a.codec}: decodeBundle: ${dec.failure.message}`)
      const dense = denseOfWire(dec.success.tensors, (n) => shapes.get(n)) // the server's path
      decodeMs.push(performance.now() - d0)
      if ("problem" in dense) throw new Error(`${a.codec}: ${dense.problem}`)
      const adm = server.admit({ sender: senders[w], version: v, batchId: batchId(0, index), samples: plan.B, tokens: plan.B * plan.T, loss, grads: dense.grads, epochBatches: plan.batchesPerEpoch })
      if (!adm.ok) {
        refused++
        progress(`[${a.codec}] version ${v}: ${senders[w]}'s gradient refused: ${adm.reason}`)
      }
    }
    const pushes: Held[] = server.choose(senders)
    if (pushes.length === 0) throw new Error(`${a.codec}: version ${v}: every gradient was refused`)
    const { step } = server.apply(lrAt(sched.success, v), pushes)
    trainLoss.push(step.loss)
    if ((v + 1) % Math.max(1, Math.round(a.steps / 10)) === 0 || v + 1 === a.steps) {
      const s = (performance.now() - tLoop) / 1000
      progress(`[${a.codec}] step ${v + 1}/${a.steps} loss ${step.loss.toFixed(3)} (${s.toFixed(0)} s, ETA ${((s / (v + 1)) * (a.steps - v - 1)).toFixed(0)} s)`)
    }
  }
  let val = 0
  for (let i = 0; i < a.valBatches; i++) val += evalLoss(def, server.params, gptBatch(valBatch(plan, i), plan.B))
  return {
    codec: a.codec,
    steps: a.steps,
    bytesPerStep: bytes / a.steps,
    manifestBytesPerStep: manifestBytes / a.steps,
    trainLoss,
    valLoss: val / a.valBatches,
    encodeMs: median(encodeMs),
    decodeMs: median(decodeMs),
    refused,
    wallS: (performance.now() - t0) / 1000
  }
}

// ---------------------------------------------------------------- run as a process

if (import.meta.main) {
  const { values: v } = parseArgs({
    options: {
      codec: { type: "string" },
      steps: { type: "string" },
      batch: { type: "string" },
      seq: { type: "string" },
      "val-batches": { type: "string" },
      "min-elements": { type: "string" },
      job: { type: "string" }
    }
  })
  const args: TrainArgs = {
    codec: v.codec ?? "f32",
    steps: Number(v.steps ?? 300),
    batch: Number(v.batch ?? 8),
    seq: Number(v.seq ?? 64),
    valBatches: Number(v["val-batches"] ?? 8),
    ...(v["min-elements"] !== undefined ? { minElements: Number(v["min-elements"]) } : {}),
    job: v.job ?? DEFAULT_JOB_FILE
  }
  const r = await train(args, (line) => process.stderr.write(line + "\n"))
  if (process.send) process.send(r, () => process.exit(0))
  else process.stdout.write(JSON.stringify(r) + "\n")
}
