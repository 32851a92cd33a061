/**
 * Implements: the control-plane protocol — what `flotilla ctl` sends to a job's
 * controller on `control.<verb>`, what it answers, and the `ControlApplied` event the
 * controller broadcasts on `events.control` for every actor to act on.
 *
 * Every request carries the protocol version `v`, the `job` it is meant for, who sent it
 * (`sender`, the ctl client's id) and a `requestId` the reply echoes. The subject's verb
 * picks the schema: `control.set-lr` must carry a `SetLr`. `_tag`s are written by hand
 * (the wire identity). Replies: `ControlAccepted`, `ControlRejected { code, reason }`,
 * `JobStatus` (for `status`) and `ControlHistory` (for `history`).
 * Does not own: validation against the job's live state (actors/controller), what each
 * actor does on a command (shared/actor/control-listener.ts and the actors).
 * See docs/PROTOCOL.md.
 */
import { Result, Schema, SchemaIssue } from "effect"
import { ProtocolDecodeError } from "./decode.ts"
import { ErrorCode, Id } from "./messages.ts"
import { PROTOCOL_VERSION } from "./subjects.ts"

const V = Schema.Literal(PROTOCOL_VERSION)
const RequestId = Schema.String.check(Schema.isMinLength(1), Schema.isMaxLength(128))
const NonNeg = Schema.Finite.check(Schema.isGreaterThanOrEqualTo(0))
const NonNegInt = Schema.Int.check(Schema.isGreaterThanOrEqualTo(0))
const PosInt = Schema.Int.check(Schema.isGreaterThan(0))

/** The largest control message the controller reads (bytes); anything bigger is rejected. */
export const CONTROL_MAX_BYTES = 64 * 1024

const envelope = { v: V, job: Id, sender: Id, requestId: RequestId }

// ---------------------------------------------------------------- requests

/** `status`: the job's live topology and training state. */
export const GetJobStatus = Schema.Struct({ _tag: Schema.Literal("GetJobStatus"), ...envelope })
/** `pause`: loaders stop leasing, parameter servers stop applying versions. */
export const PauseJob = Schema.Struct({ _tag: Schema.Literal("PauseJob"), ...envelope })
export const ResumeJob = Schema.Struct({ _tag: Schema.Literal("ResumeJob"), ...envelope })
/** `stop`: parameter servers checkpoint, every actor exits cleanly. */
export const StopJob = Schema.Struct({ _tag: Schema.Literal("StopJob"), ...envelope })
/** `checkpoint`: every parameter-server shard writes a checkpoint now. */
export const CheckpointJob = Schema.Struct({ _tag: Schema.Literal("CheckpointJob"), ...envelope })
/**
 * `set-lr`: the LR of every step from `fromStep` on (default: the next step) is `lr`,
 * until another set-lr or set-schedule. Under a plateau schedule without `fromStep`, the
 * plateau's current LR becomes `lr` (later reductions start from it).
 */
export const SetLr = Schema.Struct({
  _tag: Schema.Literal("SetLr"),
  ...envelope,
  /** checked by the controller (finite, >= 0) so the reason names the value. */
  lr: Schema.Number,
  fromStep: Schema.optional(NonNegInt)
})
/** `set-schedule`: a new schedule (shared/schedule's config) from the next step on. */
export const SetSchedule = Schema.Struct({
  _tag: Schema.Literal("SetSchedule"),
  ...envelope,
  schedule: Schema.Record(Schema.String, Schema.Unknown)
})
/** `set-optimizer`: hyperparameters of the live optimizer (its kind and state layout stay). */
export const SetOptimizer = Schema.Struct({
  _tag: Schema.Literal("SetOptimizer"),
  ...envelope,
  patch: Schema.Record(Schema.String, Schema.Union([Schema.Number, Schema.Boolean]))
})
export const ConsistencyMode = Schema.Literals(["sync", "bounded", "async"])
/** `set-consistency`: sync, bounded (with `staleness`) or async aggregation. */
export const SetConsistency = Schema.Struct({
  _tag: Schema.Literal("SetConsistency"),
  ...envelope,
  mode: ConsistencyMode,
  staleness: Schema.optional(NonNegInt)
})
/**
 * `set-compression`: gradients computed on params versions ≥ `fromVersion` travel under
 * `codec` (shared/wire/codecs.ts). The controller checks the name and, when `fromVersion` is
 * absent, picks a version a little ahead of the job's (every actor must hear of it first);
 * the broadcast always carries it, and every parameter server stamps it on its params.
 */
export const SetCompression = Schema.Struct({
  _tag: Schema.Literal("SetCompression"),
  ...envelope,
  codec: Schema.String.check(Schema.isMinLength(1), Schema.isMaxLength(32)),
  fromVersion: Schema.optional(NonNegInt)
})
/** `history`: the accepted commands, oldest first (the last `limit`, default 100). */
export const GetControlHistory = Schema.Struct({
  _tag: Schema.Literal("GetControlHistory"),
  ...envelope,
  limit: Schema.optional(PosInt)
})

/** The schema of each verb: `control.<verb>` must carry this message. */
export const CONTROL_REQUESTS = {
  status: GetJobStatus,
  pause: PauseJob,
  resume: ResumeJob,
  stop: StopJob,
  checkpoint: CheckpointJob,
  "set-lr": SetLr,
  "set-schedule": SetSchedule,
  "set-optimizer": SetOptimizer,
  "set-consistency": SetConsistency,
  "set-compression": SetCompression,
  history: GetControlHistory
} as const

export type ControlVerb = keyof typeof CONTROL_REQUESTS
export const CONTROL_VERBS = Object.keys(CONTROL_REQUESTS) as ControlVerb[]
export const isControlVerb = (v: string): v is ControlVerb => Object.hasOwn(CONTROL_REQUESTS, v)
export type ControlRequestOf<V extends ControlVerb> = (typeof CONTROL_REQUESTS)[V]["Type"]
export type ControlRequest = ControlRequestOf<ControlVerb>

/** The verbs that change the job (recorded in the history and broadcast); the rest are queries. */
export const COMMAND_VERBS = ["pause", "resume", "stop", "checkpoint", "set-lr", "set-schedule", "set-optimizer", "set-consistency", "set-compression"] as const
export type CommandVerb = (typeof COMMAND_VERBS)[number]
export const isCommandVerb = (v: string): v is CommandVerb => (COMMAND_VERBS as readonly string[]).includes(v)

export const ControlCommand = Schema.Union([PauseJob, ResumeJob, StopJob, CheckpointJob, SetLr, SetSchedule, SetOptimizer, SetConsistency, SetCompression])
export type ControlCommand = typeof ControlCommand.Type

// ---------------------------------------------------------------- the broadcast event

/**
 * On `events.control`: a command the controller validated and recorded, for every actor
 * it concerns. `seq` is its position in the job's control history.
 */
export const ControlApplied = Schema.Struct({
  _tag: Schema.Literal("ControlApplied"),
  v: V,
  job: Id,
  seq: NonNegInt,
  verb: Schema.Literals(COMMAND_VERBS),
  command: ControlCommand,
  sender: Id,
  requestId: RequestId,
  /** the controller that accepted it. */
  by: Schema.String,
  at: NonNeg,
  /**
   * Which history `seq` counts in: 0 for a JetStream history (it outlives controllers), the
   * controller's start time for an in-memory one (a restarted controller counts from 1 again).
   */
  epoch: Schema.optional(NonNeg),
  /** a repeat (the controller re-broadcasts its recent commands so a lost one is not lost), with its newest seq. */
  replayed: Schema.optional(Schema.Boolean),
  latest: Schema.optional(NonNegInt)
})
export type ControlApplied = typeof ControlApplied.Type

// ---------------------------------------------------------------- replies

export const ControlAccepted = Schema.Struct({
  _tag: Schema.Literal("ControlAccepted"),
  v: V,
  job: Schema.String,
  requestId: Schema.String,
  verb: Schema.String,
  /** the command's seq in the history. */
  seq: NonNegInt,
  by: Schema.String,
  at: NonNeg
})
export type ControlAccepted = typeof ControlAccepted.Type

export const ControlRejected = Schema.Struct({
  _tag: Schema.Literal("ControlRejected"),
  v: V,
  job: Schema.String,
  /** echoed when the request carried a readable one. */
  requestId: Schema.optional(Schema.String),
  code: ErrorCode,
  reason: Schema.String,
  by: Schema.String,
  at: NonNeg
})
export type ControlRejected = typeof ControlRejected.Type

export const ActorStatus = Schema.Struct({
  role: Schema.String,
  id: Schema.String,
  host: Schema.String,
  pid: NonNegInt,
  heartbeatAgeMs: NonNeg,
  state: Schema.String,
  info: Schema.optional(Schema.Record(Schema.String, Schema.Union([Schema.String, Schema.Number]))),
  /** times its supervisor restarted it (from its heartbeats; absent from older actors). */
  restarts: Schema.optional(NonNegInt)
})
export type ActorStatus = typeof ActorStatus.Type

const NullableNumber = Schema.NullOr(Schema.Number)

export const JobStatus = Schema.Struct({
  _tag: Schema.Literal("JobStatus"),
  v: V,
  job: Schema.String,
  requestId: Schema.String,
  by: Schema.String,
  at: NonNeg,
  /** live actors (from heartbeats), by role then id. */
  actors: Schema.Array(ActorStatus),
  /** the params version every shard has reached (the smallest); null before the first step. */
  version: Schema.NullOr(NonNegInt),
  shards: Schema.Array(Schema.Struct({ shard: NonNegInt, version: NonNegInt })),
  /** the last step the scheduler was asked an LR for. */
  step: Schema.NullOr(NonNegInt),
  /** the LR of the next step (asked of the scheduler; else the last one used). */
  lr: NullableNumber,
  schedule: Schema.String,
  lastLoss: NullableNumber,
  lastValLoss: NullableNumber,
  /** the last evaluation's metrics (loss, perplexity; or loss, accuracy, precision, recall, f1). */
  valMetrics: Schema.optional(Schema.Record(Schema.String, Schema.Number)),
  /** complete epochs (shard 0's applied log) and the job's limit (0 = none). */
  epoch: Schema.optional(Schema.Struct({ done: Schema.Int, of: Schema.Int })),
  consistency: Schema.Struct({ mode: ConsistencyMode, staleness: Schema.optional(NonNegInt) }),
  /** the gradient codec now, and the next one with the version it starts at, if a switch is pending. */
  compression: Schema.optional(Schema.Struct({ codec: Schema.String, next: Schema.optional(Schema.Struct({ codec: Schema.String, fromVersion: NonNegInt })) })),
  optimizer: Schema.Record(Schema.String, Schema.Unknown),
  paused: Schema.Boolean,
  stopped: Schema.Boolean,
  finished: Schema.Boolean
})
export type JobStatus = typeof JobStatus.Type

export const ControlHistory = Schema.Struct({
  _tag: Schema.Literal("ControlHistory"),
  v: V,
  job: Schema.String,
  requestId: Schema.String,
  by: Schema.String,
  at: NonNeg,
  /** where the history lives: a JetStream stream, or the controller's memory. */
  store: Schema.String,
  entries: Schema.Array(ControlApplied)
})
export type ControlHistory = typeof ControlHistory.Type

export const ControlReply = Schema.Union([ControlAccepted, ControlRejected, JobStatus, ControlHistory])
export type ControlReply = typeof ControlReply.Type

// ---------------------------------------------------------------- strict decoding

const formatIssue = SchemaIssue.makeFormatterDefault()

/** Decode a parsed control request against its verb's schema; unknown fields are an error. */
export const decodeControlRequest = <V extends ControlVerb>(
  verb: V,
  subject: string,
  input: unknown
): Result.Result<ControlRequestOf<V>, ProtocolDecodeError> => {
  const schema = CONTROL_REQUESTS[verb] as unknown as Schema.Codec<ControlRequestOf<V>, unknown>
  const r = Schema.decodeUnknownResult(schema)(input, { onExcessProperty: "error" })
  return Result.isSuccess(r)
    ? Result.succeed(r.success)
    : Result.fail(new ProtocolDecodeError({ subject, reason: formatIssue(r.failure.issue).replace(/\n\s*/g, " ") }))
}

/** A request for `verb` (fills `_tag` and `v`). */
export const makeControlRequest = (
  verb: ControlVerb,
  fields: { job: string; sender: string; requestId: string } & Record<string, unknown>
): Record<string, unknown> => ({ _tag: CONTROL_REQUESTS[verb].fields._tag.literal, v: PROTOCOL_VERSION, ...fields })
