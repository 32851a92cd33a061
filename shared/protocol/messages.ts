/**
 * Implements: the JSON messages of the data-parallel protocol, as Effect Schemas.
 *
 * Each actor kind's protocol is a closed union; commands are imperatives
 * (`LeaseBatch`), events past tense (`StepApplied`). `_tag` strings and the `v`
 * protocol version are the wire identity, written by hand: renaming code never
 * breaks a running fleet. Tensors never travel as JSON: see shared/wire/.
 * Control-plane messages live in shared/protocol/control.ts.
 */
import { Schema } from "effect"
import { AppliedLogJson } from "./applied-log.ts"
import { HEADERS } from "./headers.ts"
import { MAX_COUNT, MAX_LR, MAX_SAMPLES } from "./limits.ts"
import { PROTOCOL_VERSION, ROLES, TOKEN_PATTERN } from "./subjects.ts"

const V = Schema.Literal(PROTOCOL_VERSION)
export const Id = Schema.String.check(Schema.isPattern(TOKEN_PATTERN))
const NonNeg = Schema.Finite.check(Schema.isGreaterThanOrEqualTo(0))
const NonNegInt = Schema.Int.check(Schema.isGreaterThanOrEqualTo(0))
/** a count a receiver adds up (tokens, bytes): an integer float64 holds exactly (limits.ts). */
const Count = NonNegInt.check(Schema.isLessThanOrEqualTo(MAX_COUNT))
/** a step's or a push's sample count (limits.ts MAX_SAMPLES). */
const Samples = NonNegInt.check(Schema.isLessThanOrEqualTo(MAX_SAMPLES))
/** a learning rate anything applies: finite, 0 … MAX_LR (limits.ts). */
export const Lr = NonNeg.check(Schema.isLessThanOrEqualTo(MAX_LR))
const Split = Schema.Literals(["train", "val"])

// ---------------------------------------------------------------- membership

/** Every actor publishes this on `hb.<role>.<id>` every heartbeat interval. */
export const Heartbeat = Schema.Struct({
  _tag: Schema.Literal("Heartbeat"),
  v: V,
  role: Schema.Literals(ROLES),
  id: Id,
  host: Schema.String,
  pid: NonNegInt,
  startedAt: NonNeg,
  seq: NonNegInt,
  /** `leaving` is sent once on a clean shutdown so barriers drop the actor at once. */
  state: Schema.Literals(["running", "paused", "leaving"]),
  info: Schema.optional(Schema.Record(Schema.String, Schema.Union([Schema.String, Schema.Number]))),
  /** how many times a supervisor (`flotilla up`) has restarted this actor ($FLOTILLA_RESTARTS); absent = 0. */
  restarts: Schema.optional(NonNegInt)
})
export type Heartbeat = typeof Heartbeat.Type

// ---------------------------------------------------------------- data loader

/** request on `data.lease.<worker>`: the next batch for this worker. */
export const LeaseBatch = Schema.Struct({
  _tag: Schema.Literal("LeaseBatch"),
  v: V,
  worker: Id,
  split: Split,
  /** only for split "val": which validation batch (they are a fixed, ordered set). */
  index: Schema.optional(NonNegInt)
})
export type LeaseBatch = typeof LeaseBatch.Type

/**
 * on `data.fetch` (request/reply, queue group `loader`): a pipeline's last stage asks for
 * the batch of a micro-batch it holds activations of (its labels / targets), by id. Read
 * only: no lease is taken or changed. The reply is a batch like a lease's.
 */
export const FetchBatch = Schema.Struct({
  _tag: Schema.Literal("FetchBatch"),
  v: V,
  worker: Id,
  batchId: Schema.String
})
export type FetchBatch = typeof FetchBatch.Type

/**
 * The `Flotilla-Batch` header of a lease reply that carries a batch; the payload is the
 * batch's tensors as a tensor bundle (shared/wire/tensor.ts; its manifest in the
 * `Flotilla-Manifest` header), as the model's batch spec names them (shared/models/model.ts):
 * `tokens` [B, T+1] for a language model; `tokens` [B, maxLen] and `labels` [B] for a classifier.
 */
export const BatchLeased = Schema.Struct({
  _tag: Schema.Literal("BatchLeased"),
  v: V,
  batchId: Schema.String,
  epoch: NonNegInt,
  index: NonNegInt,
  split: Split,
  B: NonNegInt,
  T: NonNegInt,
  attempt: NonNegInt,
  leaseMs: NonNeg,
  /**
   * The loader's lease generation: a new one each time the loader (re)builds its table
   * (its start, a parameter-server rollback). A release or failure names it, and one of an
   * older generation is ignored.
   */
  gen: NonNegInt,
  /** batches in an epoch (all loader shards together): lets servers compact their applied log. */
  epochBatches: NonNegInt,
  /** validation batches there are (an evaluator leases indices 0 … valBatches-1). */
  valBatches: Schema.optional(NonNegInt)
})
export type BatchLeased = typeof BatchLeased.Type

/** JSON lease reply when no batch can be handed out now (all leased, awaiting apply). */
export const NoBatch = Schema.Struct({
  _tag: Schema.Literal("NoBatch"),
  v: V,
  reason: Schema.Literals(["all-leased", "exhausted", "paused", "rebuilding"]),
  retryAfterMs: NonNeg
})
export type NoBatch = typeof NoBatch.Type

/** on `data.ack.<worker>`: a worker gives a batch back (failed, or its gradient is known stale). */
export const BatchFailed = Schema.Struct({
  _tag: Schema.Literal("BatchFailed"),
  v: V,
  worker: Id,
  batchId: Schema.String,
  /** the lease generation (BatchLeased.gen) the batch was leased under. */
  gen: NonNegInt,
  reason: Schema.String
})
export type BatchFailed = typeof BatchFailed.Type

// ---------------------------------------------------------------- parameter server

/** request on `ps.<k>.pull`; the params come back as a chunked bundle (shared/wire). */
export const PullParams = Schema.Struct({
  _tag: Schema.Literal("PullParams"),
  v: V,
  worker: Id,
  minVersion: NonNegInt
})
export type PullParams = typeof PullParams.Type

/**
 * `meta.extra` of a `grads` bundle (shared/wire), decoded by the parameter server.
 * `micro` lists the micro-batches (one, or train.accumulate of them); each is applied
 * exactly once. `incarnation` is the server incarnation whose params were used.
 */
export const GradMeta = Schema.Struct({
  /** at most MAX_SAMPLES here; the server also holds it to the job's batch size (limits.ts gradMetaProblem). */
  samples: Samples.check(Schema.isGreaterThan(0)),
  tokens: Count,
  loss: Schema.Finite,
  /** squared L2 norm of the worker's whole gradient (all shards): async/bounded clipping. */
  normSq: NonNeg,
  /** micro-batch ids joined by "+" (wire extra values are strings or numbers). */
  micro: Schema.String,
  gen: NonNegInt,
  epochBatches: NonNegInt,
  incarnation: NonNeg,
  /** a relayed worker's f32 push: the codec the server stamped on its version, for the relay to encode under. */
  stamp: Schema.optional(Schema.String.check(Schema.isMaxLength(32))),
  /** with `stamp`: the run of the params it was computed on (ParamsMeta.run). */
  run: Schema.optional(NonNeg)
})
export type GradMeta = typeof GradMeta.Type

/** `meta.extra` of a `params` bundle. */
export const ParamsMeta = Schema.Struct({
  shard: NonNegInt,
  /** when this server process started (ms): a new one means a restart, maybe at a lower version. */
  incarnation: NonNeg,
  /** complete epochs in the shard's applied log at this version (evaluation per epoch). */
  epochsDone: Schema.optional(NonNegInt),
  /** the codec of gradients computed on this version (shared/wire/compression.ts); absent: f32. */
  codec: Schema.optional(Schema.String.check(Schema.isMaxLength(32))),
  /** the run the params belong to (a fresh start makes a new one): a sender's saved residuals are kept only within it. */
  run: Schema.optional(NonNeg)
})
export type ParamsMeta = typeof ParamsMeta.Type

/**
 * on `ps.<k>.ack.<worker>`: shard k holds (or already applied) the worker's gradient. A
 * worker resends a push that is not acknowledged in time; the resend is idempotent.
 */
export const PushAck = Schema.Struct({
  _tag: Schema.Literal("PushAck"),
  v: V,
  shard: NonNegInt,
  incarnation: NonNeg,
  sender: Id,
  batchId: Schema.String,
  /** the version the gradient was computed on. */
  version: NonNegInt,
  status: Schema.Literals(["held", "applied"])
})
export type PushAck = typeof PushAck.Type

/** on `ps.<k>.held` (follower shards, sync): the gradients shard k holds for `version`. */
export const GradientsHeld = Schema.Struct({
  _tag: Schema.Literal("GradientsHeld"),
  v: V,
  shard: NonNegInt,
  incarnation: NonNeg,
  version: NonNegInt,
  held: Schema.Array(Schema.Struct({ sender: Id, batchId: Schema.String }))
})
export type GradientsHeld = typeof GradientsHeld.Type

/** on `ps.<k>.norm` (sync, several shards, clipping on): shard k's squared norm of the aggregate. */
export const NormShare = Schema.Struct({
  _tag: Schema.Literal("NormShare"),
  v: V,
  shard: NonNegInt,
  incarnation: NonNeg,
  /** the version being produced. */
  version: NonNegInt,
  sumSq: NonNeg,
  /** an answer to a late peer's share (from a shard that applied the version already): never answered again. */
  echo: Schema.optional(Schema.Boolean)
})
export type NormShare = typeof NormShare.Type

/**
 * on `ps.0.decided` (sync, several shards): shard 0 chose these gradients and this LR for
 * `version`; every shard applies exactly them (a follower that missed it asks `ps.0.decision`).
 */
export const StepDecided = Schema.Struct({
  _tag: Schema.Literal("StepDecided"),
  v: V,
  shard: NonNegInt,
  incarnation: NonNeg,
  /** the version being produced. */
  version: NonNegInt,
  chosen: Schema.Array(Schema.Struct({ sender: Id, batchId: Schema.String })),
  lr: Lr
})
export type StepDecided = typeof StepDecided.Type

/** request on `ps.0.decision`: shard 0's StepDecided for `version` (a follower missed it). */
export const GetDecision = Schema.Struct({ _tag: Schema.Literal("GetDecision"), v: V, version: NonNegInt })
export type GetDecision = typeof GetDecision.Type

/** request on `ps.<k>.log`: the shard's applied log (reply AppliedLog). */
export const GetAppliedLog = Schema.Struct({ _tag: Schema.Literal("GetAppliedLog"), v: V, from: Id })

/** request on `data.info` (queue group `loader`): what the data is, for checkpoints and inference. */
export const GetDataInfo = Schema.Struct({ _tag: Schema.Literal("GetDataInfo"), v: V, from: Id })
export type GetDataInfo = typeof GetDataInfo.Type

/** reply on `data.info`: the task, sizes, and for a classifier its class names and tokenizer (shared/data/tokenizer.ts JSON). */
export const DataInfo = Schema.Struct({
  _tag: Schema.Literal("DataInfo"),
  v: V,
  task: Schema.Literals(["lm", "classify"]),
  corpus: Schema.String,
  epochBatches: NonNegInt,
  valBatches: NonNegInt,
  trainSamples: NonNegInt,
  valSamples: NonNegInt,
  labels: Schema.optional(Schema.Array(Schema.String)),
  tokenizer: Schema.optional(Schema.Unknown)
})
export type DataInfo = typeof DataInfo.Type
export type GetAppliedLog = typeof GetAppliedLog.Type

export const AppliedLog = Schema.Struct({
  _tag: Schema.Literal("AppliedLog"),
  v: V,
  shard: NonNegInt,
  incarnation: NonNeg,
  version: NonNegInt,
  log: AppliedLogJson
})
export type AppliedLog = typeof AppliedLog.Type

/** event on `ps.<k>.applied`: shard k produced `version` from these gradients. */
export const StepApplied = Schema.Struct({
  _tag: Schema.Literal("StepApplied"),
  v: V,
  shard: NonNegInt,
  incarnation: NonNeg,
  /** the new version; it was computed from gradients of version - 1 (sync). */
  version: NonNegInt,
  batchIds: Schema.Array(Schema.String),
  contributors: Schema.Array(Schema.String),
  samples: Samples,
  tokens: Count,
  /** sample-weighted mean training loss of the contributing gradients. */
  loss: Schema.Finite,
  lr: Lr,
  /** the aggregate's norm before clipping; -1 when it was not finite. */
  gradNorm: Schema.Finite,
  maxStaleness: NonNegInt,
  aggregateMs: NonNeg,
  at: NonNeg,
  final: Schema.Boolean,
  /** the data epoch of this version's batches (the newest among them). */
  epoch: Schema.optional(NonNegInt),
  /** complete epochs in this shard's applied log after this version (every batch of each applied). */
  epochsDone: Schema.optional(NonNegInt),
  /** batches per epoch (from the gradients' GradMeta), when known. */
  epochBatches: Schema.optional(NonNegInt)
})
export type StepApplied = typeof StepApplied.Type

// ---------------------------------------------------------------- scheduler

/**
 * request on `lr`. Shard 0 sends its incarnation and the scheduler state it holds (from
 * its checkpoint, or the last reply): a scheduler that just started, or that sees a new
 * incarnation (the server restarted or the job rolled back), adopts that state first.
 */
export const GetLr = Schema.Struct({
  _tag: Schema.Literal("GetLr"),
  v: V,
  step: NonNegInt,
  /** the data epoch of the step's batches (per-epoch schedules); 0 when absent. */
  epoch: Schema.optional(NonNegInt),
  incarnation: Schema.optional(NonNeg),
  state: Schema.optional(Schema.Unknown)
})
export type GetLr = typeof GetLr.Type

/** reply on `lr`, also published on `metrics.scheduler` as the schedule advances. */
export const LrForStep = Schema.Struct({
  _tag: Schema.Literal("LrForStep"),
  v: V,
  step: NonNegInt,
  lr: Lr,
  schedule: Schema.String,
  /**
   * The scheduler's whole live state (schedule, plateau counters, set-lr overrides) as of
   * this step: shard 0 keeps the newest in its checkpoints, and a restarted scheduler or a
   * rollback restores it from there (SchedulerState, shared/schedule/state.ts).
   */
  state: Schema.optional(Schema.Unknown)
})
export type LrForStep = typeof LrForStep.Type

// ---------------------------------------------------------------- metrics

export const WorkerStep = Schema.Struct({
  _tag: Schema.Literal("WorkerStep"),
  v: V,
  worker: Id,
  version: NonNegInt,
  batchId: Schema.String,
  loss: Schema.Finite,
  tokens: Count,
  waitBatchMs: NonNeg,
  waitParamsMs: NonNeg,
  computeMs: NonNeg,
  pushMs: NonNeg,
  bytesSent: NonNegInt
})
export type WorkerStep = typeof WorkerStep.Type

/**
 * `meta.extra` of a bundle on `pipe.<replica>.<k>.fwd|bwd` (shared/wire/tensor.ts): which step
 * (meta.version = the params version, meta.batchId = the step's micro-batch ids joined by
 * "+", `attempt`), which micro-batch, and what it is. kind "activation": stage k−1's output
 * for micro-batch `micro` (tensor `x`), with that micro-batch's id, rows and length;
 * "activation-grad": the gradient of the step's summed loss for stage k's output (`dx`) and
 * the micro-batch's mean loss; "tied-grad": the last stage's part of the tied weights'
 * gradient for the whole step (summed over its micro-batches), one tensor per tied weight.
 */
export const PipeMeta = Schema.Struct({
  attempt: NonNegInt,
  micro: Schema.optional(NonNegInt),
  micros: Schema.Int.check(Schema.isGreaterThan(0)),
  microBatch: Schema.optional(Schema.String),
  rows: Schema.optional(Schema.Int.check(Schema.isGreaterThan(0))),
  length: Schema.optional(NonNegInt),
  units: Schema.optional(NonNegInt),
  gen: Schema.optional(NonNegInt),
  epochBatches: Schema.optional(NonNegInt),
  loss: Schema.optional(Schema.Finite)
})
export type PipeMeta = typeof PipeMeta.Type

/** on `metrics.stage`: one pipeline stage's step (bench/pipeline.ts reads the bubble and the stash from it). */
export const StageStep = Schema.Struct({
  _tag: Schema.Literal("StageStep"),
  v: V,
  worker: Id,
  replica: Id,
  stage: NonNegInt,
  version: NonNegInt,
  attempt: NonNegInt,
  micros: NonNegInt,
  /** from this stage's first op of the step to its flush. */
  spanMs: NonNeg,
  /** computing: forwards, backwards (which recompute the forward on every stage but the last). */
  forwardMs: NonNeg,
  backwardMs: NonNeg,
  /** the most micro-batch inputs held at once for their backward, and their bytes. */
  stashPeak: NonNegInt,
  stashPeakBytes: NonNegInt,
  loss: Schema.Number,
  /** gradient bytes this stage pushed for the step (and resent since its last report). */
  bytesSent: NonNegInt
})
export type StageStep = typeof StageStep.Type

export const ValidationLoss = Schema.Struct({
  _tag: Schema.Literal("ValidationLoss"),
  v: V,
  evaluator: Id,
  version: NonNegInt,
  /** finite: the scheduler's reduce-on-plateau acts on it. */
  loss: Schema.Finite,
  batches: NonNegInt,
  /** the model's validation metrics (loss, perplexity; or loss, accuracy, precision, recall, f1). */
  metrics: Schema.optional(Schema.Record(Schema.String, Schema.Number)),
  /** complete training epochs behind the evaluated params. */
  epoch: Schema.optional(NonNegInt)
})
export type ValidationLoss = typeof ValidationLoss.Type


// ---------------------------------------------------------------- errors

/**
 * Everything an actor rejects, published on `errors` and, for a request, sent as the
 * reply: a stable machine code, a human reason, and who it was for.
 */
export const ErrorCode = Schema.Literals([
  "bad-message",
  "bad-tensor",
  "wire",
  "stale",
  "duplicate",
  "non-finite",
  "unknown-batch",
  "unknown-verb",
  "wrong-job",
  "invalid-value",
  "conflict",
  "internal"
])
export type ErrorCode = typeof ErrorCode.Type

export const Rejected = Schema.Struct({
  _tag: Schema.Literal("Rejected"),
  v: V,
  code: ErrorCode,
  reason: Schema.String,
  subject: Schema.String,
  /** the actor that rejected it. */
  by: Schema.String,
  /** the sender, when known (worker id, ctl client id). */
  sender: Schema.optional(Schema.String),
  step: Schema.optional(Schema.Number),
  /** the rejected message's id (a bundle's Flotilla-Id, a control event's seq), when it had one. */
  messageId: Schema.optional(Schema.String),
  at: NonNeg
})
export type Rejected = typeof Rejected.Type

export const rejected = (r: Omit<Rejected, "_tag" | "v" | "at">): Rejected => ({
  _tag: "Rejected",
  v: PROTOCOL_VERSION,
  at: Date.now(),
  ...r
})

/** A lease reply is a batch (binary + `Flotilla-Batch` header) or one of these. */
export const LeaseReply = Schema.Union([NoBatch, Rejected])
export type LeaseReply = typeof LeaseReply.Type

/** Header names used outside the tensor wire format. */
export const HEADER_BATCH = HEADERS.batch
