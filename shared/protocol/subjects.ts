/**
 * Implements: every NATS subject Flotilla uses, built in one place.
 *
 * A job's traffic lives under `flotilla.<job>.`; no subject starts with `$`, wildcards
 * appear only in the `*All` subscription patterns, and every token is validated so a
 * job or actor id can never inject a `.`, `*` or `>`. See docs/PROTOCOL.md.
 */

/** The protocol version every message and header carries; bump on a breaking change. */
export const PROTOCOL_VERSION = 1

/** The one pattern of a subject token, job name and actor id. */
export const TOKEN_PATTERN = /^[A-Za-z0-9_-]{1,64}$/
const TOKEN = TOKEN_PATTERN

/** A subject token (job name, actor id, role, verb): letters, digits, `_` and `-`. */
export const isToken = (s: string): boolean => TOKEN.test(s)

export class InvalidTokenError extends Error {
  readonly _tag = "InvalidTokenError"
  constructor(what: string, value: string) {
    super(`${what} ${JSON.stringify(value)} is not a valid subject token: use 1-64 of [A-Za-z0-9_-]`)
  }
}

export const assertToken = (what: string, value: string): string => {
  if (!isToken(value)) throw new InvalidTokenError(what, value)
  return value
}

/** Every actor role, as it appears in `hb.<role>.<id>` and `metrics.<role>`. */
export const ROLES = ["loader", "worker", "stage", "evaluator", "ps", "scheduler", "quantizer", "driver", "ctl"] as const
export type Role = (typeof ROLES)[number]

/** All subjects of one job. Built once per actor: `const s = subjects("gpt")`. */
export const subjects = (job: string) => {
  const p = `flotilla.${assertToken("job", job)}`
  return {
    prefix: p,
    /**
     * request/reply, queue group `loader`: a worker asks for its next batch, on its own subject
     * (the worker in the request must be the one the subject names; as for pushes, a user per
     * actor may lease only as itself).
     */
    dataLease: (worker: string) => `${p}.data.lease.${assertToken("worker id", worker)}`,
    dataLeaseAny: `${p}.data.lease.*`,
    /** a worker reports a batch failed (or given up), on its own subject; done-ness comes from `psApplied`. */
    dataAck: (worker: string) => `${p}.data.ack.${assertToken("worker id", worker)}`,
    dataAckAny: `${p}.data.ack.*`,
    /** request/reply, queue group `loader`: a train batch by id, read only (a pipeline's last stage: its labels). */
    dataFetch: `${p}.data.fetch`,
    /** request/reply, queue group `loader`: what the data is (DataInfo: task, sizes, labels, tokenizer). */
    dataInfo: `${p}.data.info`,
    /**
     * gradients for param shard k from `sender` (chunked wire bundles): the sender is in the
     * subject, so a server's permissions can bind it to its user (shared/bus/permissions.ts)
     * and shard k refuses a bundle whose meta names another sender.
     */
    psPush: (shard: number, sender: string) => `${p}.ps.${shard}.push.${assertToken("sender", sender)}`,
    psPushAny: (shard: number) => `${p}.ps.${shard}.push.*`,
    /** request/reply: params of shard k (reply is chunked to the requester's inbox). */
    psPull: (shard: number) => `${p}.ps.${shard}.pull`,
    /** broadcast: shard k's new params version (a chunked bundle of params). */
    psVersion: (shard: number) => `${p}.ps.${shard}.version`,
    psVersionAll: `${p}.ps.*.version`,
    /** event: shard k applied a step (which batches, loss, timing). JSON. */
    psApplied: (shard: number) => `${p}.ps.${shard}.applied`,
    psAppliedAll: `${p}.ps.*.applied`,
    /** shard k acknowledges a worker's push (PushAck, or a Rejected for it). */
    psAck: (shard: number, worker: string) => `${p}.ps.${shard}.ack.${assertToken("worker id", worker)}`,
    psAckFor: (worker: string) => `${p}.ps.*.ack.${assertToken("worker id", worker)}`,
    psAckAll: `${p}.ps.*.ack.*`,
    /** sync, several shards: a follower tells shard 0 which gradients it holds (GradientsHeld). */
    psHeld: (shard: number) => `${p}.ps.${shard}.held`,
    psHeldAll: `${p}.ps.*.held`,
    /** sync, several shards, clipping: each shard's squared norm of the aggregate (NormShare). */
    psNorm: (shard: number) => `${p}.ps.${shard}.norm`,
    psNormAll: `${p}.ps.*.norm`,
    /** sync, several shards: shard 0's choice of gradients and LR for a version (StepDecided). */
    psDecided: `${p}.ps.0.decided`,
    /** request/reply to shard 0: its decision (StepDecided) for a version. */
    psDecision: `${p}.ps.0.decision`,
    /** request/reply: shard k's applied log (AppliedLog). */
    psLog: (shard: number) => `${p}.ps.${shard}.log`,
    /** pipeline: activations into stage k of a replica (from stage k−1), and activation gradients into stage k (from k+1; the tied-weight gradient into stage 0). */
    pipeFwd: (replica: string, stage: number) => `${p}.pipe.${assertToken("replica", replica)}.${stage}.fwd`,
    pipeBwd: (replica: string, stage: number) => `${p}.pipe.${assertToken("replica", replica)}.${stage}.bwd`,
    /** a relayed worker's gradient for shard k, to the quantizer relay `name` (actors/quantizer/relay.ts). */
    relayPush: (name: string, shard: number, worker: string) => `${p}.relay.${assertToken("relay name", name)}.${shard}.push.${assertToken("worker id", worker)}`,
    relayPushAny: (name: string, shard: number) => `${p}.relay.${assertToken("relay name", name)}.${shard}.push.*`,
    relayPushAll: (name: string) => `${p}.relay.${assertToken("relay name", name)}.*.push.*`,
    /** the relay's answer to a relayed worker's push to shard k (the servers' PushAck or Rejected, passed on). */
    relayAck: (name: string, shard: number, worker: string) => `${p}.relay.${assertToken("relay name", name)}.${shard}.ack.${assertToken("worker id", worker)}`,
    relayAckFor: (name: string, worker: string) => `${p}.relay.${assertToken("relay name", name)}.*.ack.${assertToken("worker id", worker)}`,
    /** request/reply, queue group `quantizer`: post-training quantization of a checkpoint (actors/quantizer/service.ts). */
    quantize: `${p}.quantize`,
    /** request/reply, queue group `scheduler`: the LR for a step. */
    lr: `${p}.lr`,
    metrics: (role: Role) => `${p}.metrics.${role}`,
    metricsAll: `${p}.metrics.*`,
    control: (verb: string) => `${p}.control.${assertToken("verb", verb)}`,
    controlAll: `${p}.control.*`,
    /** broadcast: an accepted control command, applied by every actor it concerns. */
    controlApplied: `${p}.events.control`,
    /** the control history (JetStream stream FLOTILLA_<job>_CONTROL when on NATS). */
    history: `${p}.history`,
    hb: (role: Role, id: string) => `${p}.hb.${role}.${assertToken("actor id", id)}`,
    hbAll: `${p}.hb.>`,
    /** the heartbeats of one role (e.g. every parameter server: their version and incarnation). */
    hbRole: (role: Role) => `${p}.hb.${role}.*`,
    errors: `${p}.errors`
  } as const
}

export type Subjects = ReturnType<typeof subjects>

/** Queue group names: scaling out an actor is starting more members of its group. */
export const queues = {
  loader: "loader",
  scheduler: "scheduler",
  ps: (shard: number) => `ps-${shard}`,
  control: "control",
  quantizer: "quantizer"
} as const

/** The sender a subject names in its last token (`….push.<sender>`, `data.lease.<worker>`, `data.ack.<worker>`). */
export const subjectSender = (subject: string): string => subject.slice(subject.lastIndexOf(".") + 1)

/**
 * Why a message on a subject that names its sender is refused: it claims another one
 * (`claimed`: a push's meta.sender, a lease's worker); undefined when they agree. Only the
 * named sender's user may publish there (shared/bus/permissions.ts), so the refusal goes to it.
 */
export const senderProblem = (subject: string, claimed: string, what: "push" | "request"): string | undefined => {
  const named = subjectSender(subject)
  if (named === claimed) return undefined
  return what === "push"
    ? `a push on ${subject} (${named}'s subject) names sender ${JSON.stringify(claimed)}: a sender pushes on its own subject only`
    : `a request on ${subject} (${named}'s subject) names worker ${JSON.stringify(claimed)}: a worker asks on its own subject only`
}
