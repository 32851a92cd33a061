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
import { PROTOCOL_VERSION } from "./subjects.ts"

const V = Schema.Literal(PROTOCOL_VERSION)
const Id = Schema.String.check(Schema.isPattern(/^[A-Za-z0-9_-]{1,64}$/))
const NonNeg = Schema.Finite.check(Schema.isGreaterThanOrEqualTo(0))
const NonNegInt = Schema.Int.check(Schema.isGreaterThanOrEqualTo(0))
const Split = Schema.Literals(["train", "val"])

// ---------------------------------------------------------------- membership

/** Every actor publishes this on `hb.<role>.<id>` every heartbeat interval. */
export const Heartbeat = Schema.Struct({
  _tag: Schema.Literal("Heartbeat"),
  v: V,
  role: Schema.Literals(["loader", "worker", "evaluator", "ps", "scheduler", "quantizer", "driver", "ctl"]),
  id: Id,
  host: Schema.String,
  pid: NonNegInt,
  startedAt: NonNeg,
  seq: NonNegInt,
  /** `leaving` is sent once on a clean shutdown so barriers drop the actor at once. */
  state: Schema.Literals(["running", "paused", "leaving"]),
  info: Schema.optional(Schema.Record(Schema.String, Schema.Union([Schema.String, Schema.Number])))
})
export type Heartbeat = typeof Heartbeat.Type

// ---------------------------------------------------------------- data loader

/** request on `data.lease`: the next batch for this worker. */
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
 * The `Flotilla-Batch` header of a lease reply that carries a batch; the payload is
 * the tokens as little-endian int32, B × (T + 1) (inputs [:T], targets [1:]).
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
  leaseMs: NonNeg
})
export type BatchLeased = typeof BatchLeased.Type

/** JSON lease reply when no batch can be handed out now (all leased, awaiting apply). */
export const NoBatch = Schema.Struct({
  _tag: Schema.Literal("NoBatch"),
  v: V,
  reason: Schema.Literals(["all-leased", "exhausted", "paused"]),
  retryAfterMs: NonNeg
})
export type NoBatch = typeof NoBatch.Type

/** on `data.ack`: a worker gives a batch back (failed, or its gradient is known stale). */
export const BatchFailed = Schema.Struct({
  _tag: Schema.Literal("BatchFailed"),
  v: V,
  worker: Id,
  batchId: Schema.String,
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

/** event on `ps.<k>.applied`: shard k produced `version` from these gradients. */
export const StepApplied = Schema.Struct({
  _tag: Schema.Literal("StepApplied"),
  v: V,
  shard: NonNegInt,
  /** the new version; it was computed from gradients of version - 1 (sync). */
  version: NonNegInt,
  batchIds: Schema.Array(Schema.String),
  contributors: Schema.Array(Schema.String),
  samples: NonNegInt,
  tokens: NonNegInt,
  /** sample-weighted mean training loss of the contributing gradients. */
  loss: Schema.Number,
  lr: Schema.Number,
  gradNorm: Schema.Number,
  maxStaleness: NonNegInt,
  aggregateMs: NonNeg,
  at: NonNeg,
  final: Schema.Boolean
})
export type StepApplied = typeof StepApplied.Type

// ---------------------------------------------------------------- scheduler

/** request on `lr`. */
export const GetLr = Schema.Struct({ _tag: Schema.Literal("GetLr"), v: V, step: NonNegInt })
export type GetLr = typeof GetLr.Type

/** reply on `lr`, also published on `metrics.scheduler` as the schedule advances. */
export const LrForStep = Schema.Struct({
  _tag: Schema.Literal("LrForStep"),
  v: V,
  step: NonNegInt,
  lr: NonNeg,
  schedule: Schema.String
})
export type LrForStep = typeof LrForStep.Type

// ---------------------------------------------------------------- metrics

export const WorkerStep = Schema.Struct({
  _tag: Schema.Literal("WorkerStep"),
  v: V,
  worker: Id,
  version: NonNegInt,
  batchId: Schema.String,
  loss: Schema.Number,
  tokens: NonNegInt,
  waitBatchMs: NonNeg,
  waitParamsMs: NonNeg,
  computeMs: NonNeg,
  pushMs: NonNeg,
  bytesSent: NonNegInt
})
export type WorkerStep = typeof WorkerStep.Type

export const ValidationLoss = Schema.Struct({
  _tag: Schema.Literal("ValidationLoss"),
  v: V,
  evaluator: Id,
  version: NonNegInt,
  loss: Schema.Number,
  batches: NonNegInt
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
export const HEADER_BATCH = "Flotilla-Batch"
