/**
 * Implements: the job file — what to train, on what, how — with every default in one
 * place, validated by a Schema so a bad file gets a message naming the field.
 *
 * A job file is JSON or YAML holding any subset of `JobConfig`; it is deep-merged over
 * `DEFAULT_JOB` and validated. `flotilla start` prints the resolved config so a run is
 * reproducible from its log. Optimizer and schedule blocks are validated by their own
 * modules (shared/optim, shared/schedule), which fill in PyTorch's defaults.
 */
import { readFileSync } from "node:fs"
import { Result, Schema } from "effect"
import { parse as parseYaml } from "yaml"
import { decodeValue } from "../protocol/decode.ts"
import { resolveOptimizer } from "../optim/optimizers.ts"
import { resolveSchedule } from "../schedule/schedules.ts"
import { TOKEN_PATTERN } from "../protocol/subjects.ts"
import { parseCodec } from "../wire/codecs.ts"
import { DEFAULT_COMPRESSION } from "../wire/compression.ts"

const PosInt = Schema.Int.check(Schema.isGreaterThan(0))
const NonNegInt = Schema.Int.check(Schema.isGreaterThanOrEqualTo(0))
const Fraction = Schema.Finite.check(Schema.isGreaterThanOrEqualTo(0), Schema.isLessThan(1))

export const GptModel = Schema.Struct({
  kind: Schema.Literal("gpt"),
  vocabSize: PosInt,
  contextLength: PosInt,
  layers: PosInt,
  heads: PosInt,
  width: PosInt
})
export type GptModel = typeof GptModel.Type

/** The seed's classifier (shared/models/lstm-classifier.ts; the same field names). */
export const LstmModel = Schema.Struct({
  kind: Schema.Literal("lstm-classifier"),
  /** word ids 2..vocabSize-1 are the most frequent training words; 0 = padding, 1 = unknown. */
  vocabSize: PosInt,
  embedDim: PosInt,
  hidden: PosInt,
  dense: PosInt,
  /** tokens per text: longer texts are cut, shorter ones padded. */
  maxLen: PosInt,
  /** a padding step leaves the LSTM state unchanged (Keras mask_zero). */
  maskPadding: Schema.Boolean
})
export type LstmModel = typeof LstmModel.Type

export const Consistency = Schema.Union([
  Schema.Struct({ mode: Schema.Literal("sync") }),
  Schema.Struct({ mode: Schema.Literal("bounded"), staleness: NonNegInt }),
  Schema.Struct({ mode: Schema.Literal("async") })
])
export type Consistency = typeof Consistency.Type

const Loose = Schema.Record(Schema.String, Schema.Unknown)

/** Start from pretrained weights instead of a random init (actors/param-server/init.ts). */
export const InitFrom = Schema.Struct({
  /** a Flotilla checkpoint file or a job's checkpoint folder, a .safetensors file (Flotilla or Hugging Face GPT-2 names), or `store:<job>[@<version>]` (that job's checkpoints in this job's checkpoint store). */
  from: Schema.String,
  /** patterns of model tensors the weights may lack: they keep their random init (a new head). */
  allowMissing: Schema.optional(Schema.Array(Schema.String)),
  /** patterns of tensors in the weights to leave out (an old head, another vocabulary's embedding). */
  ignore: Schema.optional(Schema.Array(Schema.String)),
  /** also take the optimizer state (Flotilla checkpoints only); default: fresh. */
  optimizer: Schema.optional(Schema.Boolean)
})
export type InitFrom = typeof InitFrom.Type

/** LoRA adapters on the GPT's linear layers: only they are trained (shared/models/lora.ts). */
export const Lora = Schema.Struct({
  rank: PosInt,
  alpha: Schema.Finite.check(Schema.isGreaterThan(0)),
  /** linear layers, as patterns over their names without `.weight`: `h.*.attn.c_attn`, `h.*.mlp`. */
  targets: Schema.Array(Schema.String),
  /** accepted for compatibility; Flotilla's models have no dropout, so only 0. */
  dropout: Schema.optional(Schema.Literal(0))
})
export type Lora = typeof Lora.Type

/** `train.compression` (shared/wire/compression.ts); a bare codec name is `{ codec }`. */
export const Compression = Schema.Struct({
  /** the gradient codec: f32, bf16, int8, int4, sign1, topk:F (checked against the registry). */
  codec: Schema.String,
  /** versions that push f32 before the codec starts. */
  warmupSteps: NonNegInt,
  /** tensors smaller than this travel f32. */
  minElements: NonNegInt,
  /** the params broadcast: f32 or bf16. */
  params: Schema.Literals(["f32", "bf16"])
})
export type Compression = typeof Compression.Type

export const JobConfig = Schema.Struct({
  /** job name: the `<job>` token of every subject. */
  job: Schema.String.check(Schema.isPattern(TOKEN_PATTERN)),
  model: Schema.Union([GptModel, LstmModel]),
  data: Schema.Struct({
    /**
     * Language models: "moby-dick" (bundled), a text file, or a folder of .txt/.md files.
     * Classifiers: "spam-assassin" (bundled), a folder with one subfolder of .txt files per
     * class, or a .jsonl / .csv file with text and label (shared/data/labelled.ts).
     */
    corpus: Schema.String,
    /** classifiers: the two classes, in label-id order (default: the corpus' two names, sorted). A label that is neither is an error naming where it is. */
    labels: Schema.optional(Schema.Tuple([Schema.String, Schema.String])),
    valFraction: Fraction,
    /** rows per batch a worker leases (sequences, or texts): a sync step averages one batch (× accumulate) per live worker. */
    batchSize: PosInt,
    seed: NonNegInt,
    /** validation batches per evaluation (language models; a classifier evaluates its whole validation split). */
    valBatches: PosInt
  }),
  train: Schema.Struct({
    /** the job ends at this many versions (optimizer steps) or at `epochs`, whichever comes first. */
    steps: PosInt,
    /** stop after this many passes over the training data (0 = no limit). */
    epochs: NonNegInt,
    /** gradient accumulation: micro-batches a worker averages into each gradient it pushes. */
    accumulate: PosInt,
    consistency: Consistency,
    seed: NonNegInt,
    /** evaluate on the validation split every N versions (0 = never), or "epoch": after each epoch. */
    evalEvery: Schema.Union([NonNegInt, Schema.Literal("epoch")]),
    /** checkpoint every N versions (0 = only on stop). */
    checkpointEvery: NonNegInt,
    checkpointDir: Schema.String,
    /** patterns of tensors that are not trained: no gradient is pushed for them, no optimizer state held (shared/models/patterns.ts). */
    freeze: Schema.Array(Schema.String),
    /** LoRA: train low-rank adapters only (the base weights are frozen). */
    lora: Schema.optional(Lora),
    /** where parameter servers keep checkpoints: "file" (checkpointDir) or "jetstream" (a JetStream object store on the job's NATS, so a server relaunched on another host finds them). */
    checkpointStore: Schema.Literals(["file", "jetstream"]),
    /** gradient compression on the wire, with error feedback (shared/wire/compression.ts); `ctl set-compression` changes the codec live. */
    compression: Compression,
    /** global-norm gradient clipping (0 = off). */
    clipNorm: Schema.Finite.check(Schema.isGreaterThanOrEqualTo(0)),
    /** a leased batch not applied within this time is re-issued. */
    leaseTimeoutMs: PosInt,
    heartbeatMs: PosInt,
    /** an actor silent for this long is dropped from the membership. */
    livenessMs: PosInt
  }),
  init: Schema.optional(InitFrom),
  optimizer: Loose,
  schedule: Loose,
  topology: Schema.Struct({
    /** data-parallel replicas (each a whole model, or a pipeline of `stages` workers). */
    workers: PosInt,
    psShards: PosInt,
    /** pipeline stages per replica (1 = no pipeline). Stage k's tensors live on their own PS shards. */
    stages: PosInt,
    /** pipeline: loader batches (micro-batches) per step and replica; at least `stages`. */
    microBatches: PosInt,
    /** pipeline schedule: 1F1B (default: at most S micro-batches stashed per stage) or GPipe (fill, then drain; M stashed). */
    schedule: Schema.Literals(["1f1b", "gpipe"]),
    /** how the model is cut: balanced by FLOPs (default) or params, or blocks / layers per stage ([2, 2]). */
    partition: Schema.Union([Schema.Literals(["flops", "params"]), Schema.Array(PosInt)])
  })
})
export type JobConfig = typeof JobConfig.Type

/** The defaults: a small GPT on Moby Dick that trains in about two minutes on 2 cores (wasm). */
export const DEFAULT_JOB: JobConfig = {
  job: "gpt",
  model: { kind: "gpt", vocabSize: 256, contextLength: 64, layers: 2, heads: 4, width: 64 },
  data: { corpus: "moby-dick", valFraction: 0.05, batchSize: 16, seed: 1337, valBatches: 4 },
  train: {
    steps: 1000,
    epochs: 0,
    accumulate: 1, // micro-batches per pushed gradient
    consistency: { mode: "sync" },
    seed: 1337,
    evalEvery: 100,
    checkpointEvery: 250,
    checkpointDir: "checkpoints",
    checkpointStore: "file",
    freeze: [],
    compression: DEFAULT_COMPRESSION,
    clipNorm: 1,
    leaseTimeoutMs: 30_000,
    heartbeatMs: 500,
    // longer than the slowest step: a worker's heartbeats pause while it computes
    livenessMs: 10_000
  },
  optimizer: { kind: "adamw", weightDecay: 0.01 },
  schedule: { kind: "cosine", lr: 3e-3, totalSteps: 1000, minLr: 3e-4 }, // warmup: steps / 15 unless given
  topology: { workers: 1, psShards: 1, stages: 1, microBatches: 1, schedule: "1f1b", partition: "flops" }
}

/** The seed's classifier shape: what an lstm-classifier model block leaves out. */
export const LSTM_DEFAULTS: LstmModel = { kind: "lstm-classifier", vocabSize: 10_000, embedDim: 64, hidden: 64, dense: 64, maxLen: 100, maskPadding: true }

export class JobConfigError extends Error {
  readonly _tag = "JobConfigError"
}

const isPlainObject = (x: unknown): x is Record<string, unknown> =>
  typeof x === "object" && x !== null && !Array.isArray(x)

/** Deep-merge `patch` over `base` (objects merge, everything else replaces). */
export const deepMerge = (base: unknown, patch: unknown): unknown => {
  if (!isPlainObject(base) || !isPlainObject(patch)) return patch === undefined ? base : patch
  const out: Record<string, unknown> = { ...base }
  for (const [k, v] of Object.entries(patch)) out[k] = deepMerge(base[k], v)
  return out
}

/**
 * Resolve a partial job over the defaults. Model and schedule blocks whose `kind`
 * changes replace the default block instead of merging into it.
 */
export const resolveJob = (partial: unknown, source = "job"): JobConfig => {
  if (partial !== undefined && !isPlainObject(partial)) {
    throw new JobConfigError(`${source}: expected an object at the top level`)
  }
  const p = (partial ?? {}) as Record<string, unknown>
  const base: Record<string, unknown> = { ...DEFAULT_JOB }
  for (const key of ["model", "optimizer", "schedule"] as const) {
    const block = p[key]
    if (isPlainObject(block) && "kind" in block && block.kind !== (DEFAULT_JOB[key] as { kind: unknown }).kind) {
      base[key] = key === "model" && block.kind === "lstm-classifier" ? LSTM_DEFAULTS : {}
    }
  }
  // a job bounded by epochs only (no steps given) runs until its epochs are done
  const pTrain = isPlainObject(p.train) ? p.train : {}
  if (Number(pTrain.epochs) > 0 && pTrain.steps === undefined) base.train = { ...DEFAULT_JOB.train, steps: Number.MAX_SAFE_INTEGER }
  // the schedule's horizon follows the step count (or, per epoch, the epoch count) unless given
  // a pipeline's stages each get their own PS shard unless the job says otherwise; M defaults to max(4, S)
  const pTop = isPlainObject(p.topology) ? p.topology : {}
  const stages = Number(pTop.stages ?? 1)
  if (stages > 1) {
    base.topology = {
      ...DEFAULT_JOB.topology,
      ...(pTop.psShards === undefined ? { psShards: stages } : {}),
      ...(pTop.microBatches === undefined ? { microBatches: Math.max(4, stages) } : {})
    }
  }
  // `train.compression: int8` is `{ codec: int8 }`
  const given = typeof pTrain.compression === "string" ? { ...p, train: { ...pTrain, compression: { codec: pTrain.compression } } } : p
  const merged = deepMerge(base, given) as Record<string, unknown>
  const sched = merged.schedule as Record<string, unknown>
  const perEpoch = isPlainObject(sched) && sched.per === "epoch"
  const steps = perEpoch ? (merged.train as Record<string, unknown>)?.epochs : (merged.train as Record<string, unknown>)?.steps
  if (isPlainObject(sched) && !(isPlainObject(p.schedule) && "totalSteps" in p.schedule) && "totalSteps" in sched) {
    merged.schedule = { ...sched, totalSteps: steps }
  } else if (perEpoch && (sched.kind === "cosine" || sched.kind === "linear") && sched.totalSteps === undefined) {
    merged.schedule = { ...sched, totalSteps: steps }
  }
  const sch = merged.schedule as Record<string, unknown>
  if (isPlainObject(sch) && (sch.kind === "cosine" || sch.kind === "linear") && sch.warmupSteps === undefined) {
    merged.schedule = { ...sch, warmupSteps: Math.floor(Number(sch.totalSteps ?? steps) / 15) }
  }
  const r = decodeValue(JobConfig, source, merged)
  if (Result.isFailure(r)) throw new JobConfigError(`${source}: ${r.failure.reason}`)
  const job = r.success
  if (job.model.kind === "gpt" && job.model.width % job.model.heads !== 0) {
    throw new JobConfigError(`${source}: model.width (${job.model.width}) must be divisible by model.heads (${job.model.heads})`)
  }
  pipelineProblem(job, source)
  const codec = parseCodec(job.train.compression.codec)
  if (Result.isFailure(codec)) throw new JobConfigError(`${source}: train.compression.codec: ${codec.failure}`)
  const opt = resolveOptimizer(job.optimizer as never)
  if (Result.isFailure(opt)) throw new JobConfigError(`${source}: ${opt.failure.message}`)
  const schedR = resolveSchedule(job.schedule as never)
  if (Result.isFailure(schedR)) throw new JobConfigError(`${source}: ${schedR.failure.message}`)
  return { ...job, optimizer: { ...opt.success }, schedule: { ...schedR.success } }
}

/** A pipeline topology the rest of the system cannot run, as a JobConfigError (the cut itself is checked against the model: shared/models/pipeline.ts). */
const pipelineProblem = (job: JobConfig, source: string): void => {
  const t = job.topology
  if (t.stages === 1) return
  const fail = (m: string) => {
    throw new JobConfigError(`${source}: topology: ${m}`)
  }
  if (t.microBatches < t.stages) fail(`microBatches (${t.microBatches}) must be at least stages (${t.stages}): with fewer micro-batches than stages a stage idles through every step`)
  if (t.psShards % t.stages !== 0) fail(`psShards (${t.psShards}) must be a multiple of stages (${t.stages}): each stage's tensors live on their own parameter-server shards`)
  if (job.train.consistency.mode !== "sync") fail(`a pipeline (stages ${t.stages}) updates synchronously, once per step after the flush; train.consistency ${job.train.consistency.mode} is not supported`)
  if (job.train.accumulate !== 1) fail(`a pipeline's micro-batches are topology.microBatches; train.accumulate must be 1 (got ${job.train.accumulate})`)
  if (Array.isArray(t.partition) && t.partition.length !== t.stages) fail(`partition [${t.partition}] names ${t.partition.length} stages, topology.stages is ${t.stages}`)
}

/** Read a job file (JSON or YAML) and resolve it. */
export const loadJobFile = (path: string): JobConfig => {
  let text: string
  try {
    text = readFileSync(path, "utf8")
  } catch (e) {
    throw new JobConfigError(`cannot read job file ${path}: ${(e as Error).message}`)
  }
  let parsed: unknown
  try {
    parsed = parseYaml(text)
  } catch (e) {
    throw new JobConfigError(`job file ${path} is neither JSON nor YAML: ${(e as Error).message}`)
  }
  return resolveJob(parsed ?? {}, path)
}
