/**
 * Implements: who may do what on a job's NATS subjects — the job's user roles, each role's
 * least-privilege publish / subscribe allow lists (derived from docs/PROTOCOL.md and the
 * actors' code: every `bus.publish`, `bus.request`, `bus.subscribe` and wire transfer), and
 * rendering them as a nats-server account block: `accountBlock(job, shards, users)`. The
 * one source of the permissions in infra/nats/nats.conf (checked by test/infra.test.ts),
 * `flotilla up`'s own server (cli/up.ts) and `flotilla infra account` (cli/infra.ts).
 * Does not own: presenting credentials (shared/bus/nats.ts, cli/auth.ts), generating and
 * storing them (cli/infra.ts, cli/up.ts), the subjects (shared/protocol/subjects.ts).
 *
 * Rules, in NATS terms:
 *  - one account per job (`JOB_<JOB>`): nothing of another job is visible, JetStream included;
 *  - replies go back only through `allow_responses` (a responder may publish once to the
 *    reply subject of a request it received), and only roles that answer requests have it;
 *    nobody may publish to another client's request inbox (`_INBOX.<nuid>.…`);
 *  - `_INBOX.flotilla.*` (shared/wire/transport.ts: a pull's frames go to the requester's
 *    inbox) is published to by the parameter servers only;
 *  - a request subject (`lr`, `control.*`, `data.lease`, `ps.<k>.pull`, …) is subscribed to
 *    by the role that serves it only, so no other user can answer (or swallow) a request;
 *  - nobody may delete or purge a stream but its own checkpoint objects (`$JS.API.STREAM.DELETE`
 *    is denied to every role).
 */
import { assertToken, isToken } from "../protocol/subjects.ts"

/** The role of a NATS user of a job; `ps-<k>` is the parameter server of shard k. */
export type JobRole = "loader" | "scheduler" | "worker" | "evaluator" | "quantizer" | "observer" | "operator" | "driver" | `ps-${number}`

/** What each role is for (docs/SECURITY.md has the table). */
export const ROLE_PURPOSE: Record<string, string> = {
  loader: "the data loader (flotilla launch loader)",
  scheduler: "the LR scheduler and the job's controller (flotilla launch scheduler)",
  "ps-k": "the parameter server of shard k (flotilla launch param-server --shard k --id ps-k)",
  worker: "every worker: data-parallel, pipeline stage, relayed (flotilla launch worker)",
  evaluator: "the evaluator (flotilla launch evaluator)",
  quantizer: "quantization service and gradient relay (flotilla launch quantizer)",
  observer: "read-only: dashboards, flotilla ctl status / history",
  operator: "flotilla ctl (every verb) and flotilla quantize --nats",
  driver: "flotilla up's own watcher: progress, the final params, the summary"
}

/** Every role of a job with `shards` parameter-server shards, in a fixed order. */
export const jobRoles = (shards: number): JobRole[] => {
  if (!Number.isInteger(shards) || shards < 1 || shards > 1024) throw new Error(`shards must be an integer in [1, 1024], got ${shards}`)
  return ["loader", "scheduler", ...Array.from({ length: shards }, (_, k): JobRole => `ps-${k}`), "worker", "evaluator", "quantizer", "observer", "operator", "driver"]
}


/** The role a `flotilla launch <role>` process connects as (cli/topology.ts roles). */
export const roleOfActor = (actorRole: string, shard: number): JobRole => (actorRole === "param-server" ? `ps-${shard}` : (actorRole as JobRole))

export interface RolePermissions {
  readonly publish: ReadonlyArray<string>
  readonly subscribe: ReadonlyArray<string>
  /** subscriptions refused even though `subscribe` matches (`"<subject> <queue>"`: queue subscriptions). */
  readonly subscribeDeny?: ReadonlyArray<string>
  readonly publishDeny?: ReadonlyArray<string>
  /** answers requests: may publish once to the reply subject of a request it received. */
  readonly responses: boolean
}

/** Requests and the JetStream inboxes every client needs: nats.js's request inbox and the wire transport's. */
const INBOX = "_INBOX.>"
/** The transport's private inboxes (shared/wire/transport.ts DEFAULT_INBOX_PREFIX), where a pull's frames go. */
const TRANSPORT_INBOX = "_INBOX.flotilla.*"
/** The object store the parameter servers keep checkpoints in (shared/checkpoint/store.ts DEFAULT_BUCKET). */
const CHECKPOINT_BUCKET = "flotilla-checkpoints"
const NO_DELETE = ["$JS.API.STREAM.DELETE.>"]

/** JetStream API of the checkpoint object store (nats.js `js.views.os`): create, write, read, list, prune. */
const checkpointApi = (write: boolean): string[] => {
  const stream = `OBJ_${CHECKPOINT_BUCKET}`
  const read = [
    "$JS.API.INFO",
    "$JS.API.STREAM.NAMES",
    `$JS.API.STREAM.INFO.${stream}`,
    `$JS.API.STREAM.MSG.GET.${stream}`,
    // a server that serves the bucket's stream with allow_direct (2.10 and newer) reads metadata this way
    `$JS.API.DIRECT.GET.${stream}`,
    `$JS.API.DIRECT.GET.${stream}.>`,
    `$JS.API.CONSUMER.CREATE.${stream}`,
    `$JS.API.CONSUMER.CREATE.${stream}.>`,
    `$JS.API.CONSUMER.INFO.${stream}.*`,
    `$JS.API.CONSUMER.MSG.NEXT.${stream}.*`,
    `$JS.API.CONSUMER.DELETE.${stream}.*`,
    // flow control of the ordered consumer a read streams chunks through
    `$JS.FC.${stream}.>`
  ]
  return write
    ? [...read, `$JS.API.STREAM.CREATE.${stream}`, `$JS.API.STREAM.PURGE.${stream}`, `$O.${CHECKPOINT_BUCKET}.>`]
    : read
}

/** JetStream API of the control history (actors/controller/history.ts): its stream only. */
const historyApi = (job: string, historySubject: string): string[] => {
  const stream = `FLOTILLA_${job}_CONTROL`
  return [
    "$JS.API.INFO",
    `$JS.API.STREAM.CREATE.${stream}`,
    `$JS.API.STREAM.INFO.${stream}`,
    `$JS.API.CONSUMER.CREATE.${stream}`,
    `$JS.API.CONSUMER.CREATE.${stream}.>`,
    `$JS.API.CONSUMER.INFO.${stream}.*`,
    `$JS.API.CONSUMER.MSG.NEXT.${stream}.*`,
    `$JS.API.CONSUMER.DELETE.${stream}.*`,
    historySubject
  ]
}

/**
 * One actor with a user of its own (`flotilla up` makes one per loader, scheduler, worker and
 * evaluator): its id, and for a pipeline stage worker its replica (stage 0's id: the sender of
 * the replica's pushes and its lease owner).
 */
export interface Member {
  readonly id: string
  readonly replica?: string
}

/** The roles whose users can be one per actor (Member). */
export const MEMBER_ROLES: ReadonlyArray<JobRole> = ["loader", "scheduler", "worker", "evaluator"]

/**
 * The permissions of `role` in job `job` (subjects from shared/protocol/subjects.ts, written
 * out as patterns). With `member`, the user is one actor's: it may heartbeat only as its own
 * id, and a worker hears only its own acks (`ps.*.ack.<replica or id>`, `relay.*.*.ack.<id>`)
 * and speaks only in its own replica's pipeline (`pipe.<replica or id>.*`); so one member
 * can neither drop another (a `leaving` beat), nor keep a dead one alive, nor read or
 * disturb another replica's pipeline.
 */
export const rolePermissions = (job: string, role: JobRole, member?: Member): RolePermissions => {
  const perm = permissionsOfRole(job, role)
  if (member === undefined) return perm
  if (!MEMBER_ROLES.includes(role)) throw new Error(`role ${role} has one user per role, not one per actor`)
  const p = `flotilla.${assertToken("job", job)}`
  const id = assertToken("actor id", member.id)
  const replica = assertToken("replica", member.replica ?? member.id)
  const bind = (xs: ReadonlyArray<string>, to: Readonly<Record<string, string>>) => xs.map((x) => to[x] ?? x)
  const pub: Record<string, string> = { [`${p}.hb.${role}.*`]: `${p}.hb.${role}.${id}`, ...(role === "evaluator" ? { [`${p}.data.lease.*`]: `${p}.data.lease.${id}` } : {}) }
  const sub: Record<string, string> = {}
  if (role === "worker") {
    pub[`${p}.hb.stage.*`] = `${p}.hb.stage.${id}`
    pub[`${p}.ps.*.push.*`] = `${p}.ps.*.push.${replica}`
    pub[`${p}.data.lease.*`] = `${p}.data.lease.${replica}`
    pub[`${p}.data.ack.*`] = `${p}.data.ack.${replica}`
    pub[`${p}.relay.*.*.push.*`] = `${p}.relay.*.*.push.${id}`
    pub[`${p}.pipe.*.*.fwd`] = `${p}.pipe.${replica}.*.fwd`
    pub[`${p}.pipe.*.*.bwd`] = `${p}.pipe.${replica}.*.bwd`
    sub[`${p}.ps.*.ack.*`] = `${p}.ps.*.ack.${replica}`
    sub[`${p}.relay.*.*.ack.*`] = `${p}.relay.*.*.ack.${id}`
    sub[`${p}.pipe.*.*.fwd`] = `${p}.pipe.${replica}.*.fwd`
    sub[`${p}.pipe.*.*.bwd`] = `${p}.pipe.${replica}.*.bwd`
  }
  return { ...perm, publish: bind(perm.publish, pub), subscribe: bind(perm.subscribe, sub) }
}

const permissionsOfRole = (job: string, role: JobRole): RolePermissions => {
  const p = `flotilla.${assertToken("job", job)}`
  const control = `${p}.events.control`
  switch (role) {
    case "loader":
      return {
        publish: [`${p}.ps.*.log`, `${p}.hb.loader.*`, `${p}.errors`],
        subscribe: [`${p}.data.lease.*`, `${p}.data.info`, `${p}.data.fetch`, `${p}.data.ack.*`, `${p}.ps.*.applied`, `${p}.ps.*.ack.*`, `${p}.hb.>`, control, INBOX],
        responses: true
      }
    case "scheduler":
      // the scheduler answers `lr`; the controller in its process answers `control.*`, broadcasts events.control, keeps the history
      return {
        publish: [`${p}.lr`, `${p}.hb.scheduler.*`, `${p}.metrics.scheduler`, `${p}.errors`, control, ...historyApi(job, `${p}.history`)],
        subscribe: [`${p}.lr`, `${p}.control.*`, `${p}.metrics.*`, `${p}.ps.*.applied`, `${p}.hb.>`, control, INBOX],
        publishDeny: NO_DELETE,
        responses: true
      }
    case "worker":
      return {
        publish: [
          `${p}.data.lease.*`, `${p}.data.fetch`, `${p}.data.ack.*`, `${p}.ps.*.push.*`, `${p}.ps.*.pull`, `${p}.relay.*.*.push.*`,
          `${p}.pipe.*.*.fwd`, `${p}.pipe.*.*.bwd`, `${p}.hb.worker.*`, `${p}.hb.stage.*`, `${p}.metrics.worker`, `${p}.metrics.stage`, `${p}.errors`
        ],
        subscribe: [`${p}.ps.*.version`, `${p}.hb.ps.*`, `${p}.ps.*.ack.*`, `${p}.relay.*.*.ack.*`, `${p}.pipe.*.*.fwd`, `${p}.pipe.*.*.bwd`, control, `${p}.errors`, INBOX],
        responses: false
      }
    case "evaluator":
      return {
        publish: [`${p}.data.lease.*`, `${p}.ps.*.pull`, `${p}.hb.evaluator.*`, `${p}.metrics.evaluator`],
        subscribe: [`${p}.ps.*.version`, `${p}.hb.ps.*`, control, INBOX],
        responses: false
      }
    case "quantizer":
      // the quantize service, and a relay: one worker (`relay-<name>`) to the servers
      return {
        publish: [`${p}.ps.*.push.*`, `${p}.relay.*.*.ack.*`, `${p}.hb.quantizer.*`, `${p}.hb.worker.*`, `${p}.errors`],
        subscribe: [`${p}.quantize`, `${p}.relay.*.*.push.*`, `${p}.ps.*.ack.*`, `${p}.hb.>`, control, INBOX],
        responses: true
      }
    case "observer":
      // reads everything of the job, asks status and history; no queue subscriptions (it could swallow requests)
      return {
        publish: [`${p}.control.status`, `${p}.control.history`],
        subscribe: [`${p}.>`, INBOX],
        subscribeDeny: [`${p}.> *`],
        responses: false
      }
    case "operator":
      return { publish: [`${p}.control.*`, `${p}.quantize`], subscribe: [INBOX], responses: false }
    case "driver":
      return {
        publish: [`${p}.ps.*.pull`, ...checkpointApi(false)],
        subscribe: [`${p}.ps.*.applied`, `${p}.metrics.*`, `${p}.hb.>`, control, INBOX],
        publishDeny: NO_DELETE,
        responses: false
      }
  }
  const m = /^ps-(\d+)$/.exec(role)
  if (m === null) throw new Error(`unknown role ${JSON.stringify(role)}`)
  const k = Number(m[1])
  const ps = `${p}.ps.${k}`
  return {
    publish: [
      `${ps}.version`, `${ps}.applied`, `${ps}.ack.*`, `${ps}.held`, `${ps}.norm`, ...(k === 0 ? [`${p}.ps.0.decided`] : [`${p}.ps.0.decision`]),
      `${p}.hb.ps.ps-${k}`, `${p}.errors`, `${p}.lr`, `${p}.data.info`, TRANSPORT_INBOX, ...checkpointApi(true)
    ],
    subscribe: [
      `${ps}.push.*`, `${ps}.pull`, `${ps}.log`, ...(k === 0 ? [`${p}.ps.0.decision`, `${p}.ps.*.held`] : [`${p}.ps.0.decided`]),
      `${p}.ps.*.norm`, `${p}.hb.>`, control, INBOX
    ],
    publishDeny: NO_DELETE,
    responses: true
  }
}

/** How a user proves who it is: an nkey (public key, or a `$VAR` of one), or a user name and password. */
export type UserAuth =
  | { readonly kind: "nkey"; readonly nkey: string }
  | { readonly kind: "password"; readonly user: string; readonly password: string }

/** The account name of a job: `JOB_<job>`, upper-cased, `-` as `_`. */
export const accountName = (job: string): string => `JOB_${assertToken("job", job).toUpperCase().replace(/-/g, "_")}`

/** The environment variable a config names for a role's nkey: FLOTILLA_<JOB>_<ROLE>_NKEY. */
export const nkeyEnvVar = (job: string, role: JobRole): string =>
  `FLOTILLA_${assertToken("job", job).toUpperCase().replace(/-/g, "_")}_${role.toUpperCase().replace(/-/g, "_")}_NKEY`

/** A value in a nats-server config: `$VAR` as is, anything else quoted. */
const value = (v: string): string => (/^\$[A-Za-z_][A-Za-z0-9_]*$/.test(v) ? v : JSON.stringify(v))
const list = (xs: ReadonlyArray<string>): string => `[${xs.map((x) => JSON.stringify(x)).join(", ")}]`

/**
 * The account block of `job` (nats-server config syntax, to sit inside `accounts { }`), one
 * user per entry of `users` (a role's, or with `member` one actor's; a role absent from
 * `users` has no user). JetStream is enabled
 * for the account: the control history and the JetStream checkpoint store live in it.
 */
export const accountBlock = (job: string, users: ReadonlyArray<{ readonly role: JobRole; readonly auth: UserAuth; readonly member?: Member }>, indent = "  "): string => {
  const i1 = indent
  const i2 = indent.repeat(2)
  const i3 = indent.repeat(3)
  const lines = [`${i1}# job ${job}: one user per role, least privilege (shared/bus/permissions.ts, docs/SECURITY.md)`, `${i1}${accountName(job)}: {`, `${i2}jetstream: enabled`, `${i2}users: [`]
  for (const { role, auth, member } of users) {
    const perm = rolePermissions(job, role, member)
    const who = auth.kind === "nkey" ? `nkey: ${value(auth.nkey)}` : `user: ${value(auth.user)}, password: ${value(auth.password)}`
    const pub = perm.publishDeny ? `{ allow: ${list(perm.publish)}, deny: ${list(perm.publishDeny)} }` : `{ allow: ${list(perm.publish)} }`
    const sub = perm.subscribeDeny ? `{ allow: ${list(perm.subscribe)}, deny: ${list(perm.subscribeDeny)} }` : `{ allow: ${list(perm.subscribe)} }`
    lines.push(
      `${i3}# ${role}${member ? ` ${member.id}${member.replica && member.replica !== member.id ? ` (replica ${member.replica})` : ""}` : ""}`,
      `${i3}{ ${who}, permissions: {`,
      `${i3}${indent}publish: ${pub}`,
      `${i3}${indent}subscribe: ${sub}`,
      ...(perm.responses ? [`${i3}${indent}allow_responses: true`] : []),
      `${i3}} }`
    )
  }
  lines.push(`${i2}]`, `${i1}}`)
  return lines.join("\n") + "\n"
}

/** A job name for a config: a subject token (letters, digits, `_`, `-`). */
export const checkJobName = (job: string): string => {
  if (!isToken(job)) throw new Error(`job ${JSON.stringify(job)} is not a valid job name: use 1-64 of [A-Za-z0-9_-]`)
  return job
}
