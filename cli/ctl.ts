/**
 * Implements: `flotilla ctl <job> <verb> [args]` — control a running job over NATS — and
 * `requestControl`, the client the command (and tests) use: build a control request,
 * send it to `control.<verb>`, decode the controller's reply.
 *
 *   flotilla ctl gpt status                       live topology and training state
 *   flotilla ctl gpt set-lr 1e-4 [--from-step N]
 *   flotilla ctl gpt set-optimizer beta2=0.95 weightDecay=0.1
 *   flotilla ctl gpt set-consistency bounded 2    (or sync | async | bounded:2)
 *   flotilla ctl gpt set-schedule '{"kind":"constant","lr":1e-3}'
 *   flotilla ctl gpt pause | resume | checkpoint | stop | history [--limit N]
 *
 * Exit code 0 when accepted (or answered), 1 when rejected or no controller answers,
 * 2 on a usage error. The controller validates everything; the client only parses.
 * Does not own: the protocol (shared/protocol/control.ts), the controller.
 */
import { randomUUID } from "node:crypto"
import { hostname, userInfo } from "node:os"
import { parseArgs } from "node:util"
import { Effect, Result } from "effect"
import { Bus, type BusShape } from "../shared/bus/Bus.ts"
import { NatsBus } from "../shared/bus/nats.ts"
import {
  CONTROL_VERBS,
  ControlReply,
  isControlVerb,
  makeControlRequest,
  type ControlHistory,
  type ControlVerb,
  type JobStatus
} from "../shared/protocol/control.ts"
import { decodeBytes, encodeMessage } from "../shared/protocol/decode.ts"
import { isToken, subjects } from "../shared/protocol/subjects.ts"
import { UsageError } from "./main.ts"
import { AUTH_HELP, AUTH_OPTIONS, authFromArgs } from "./auth.ts"
import { logLevelFromEnv, loggingLayer } from "./runtime.ts"

export const CTL_HELP = `usage: flotilla ctl <job> <verb> [args] [--nats URL] [--json]

Sends a control message to a running job's controller (it runs with the scheduler) and
prints the answer. Exit code 1 when the controller rejects it, with the reason.

verbs:
  status                         actors (role, id, host, heartbeat age, state, restarts), version,
                                 step, LR, losses, consistency, paused
  pause | resume                 stop / continue leasing batches and applying versions
  checkpoint                     every parameter-server shard checkpoints now
  stop                           servers checkpoint, then every actor exits cleanly
  set-lr LR [--from-step N]      the LR from the next step (or from step N) on
  set-schedule JSON              e.g. '{"kind":"cosine","lr":1e-3,"totalSteps":500}'
  set-optimizer K=V [K=V ...]    live hyperparameters, e.g. beta2=0.95 weightDecay=0.1
  set-consistency MODE [S]       sync | async | bounded S (or bounded:S)
  set-compression CODEC [--from-version V]
                                 the gradient codec (f32 bf16 int8 int4 sign1 topk:F) from version V
                                 (default: a few versions ahead, chosen by the controller) on
  history [--limit N]            accepted commands: who sent what, when

options:
  --nats URL      NATS server (default $NATS_URL or nats://127.0.0.1:4222)
  --json          print the controller's reply as JSON
  --sender ID     who you are in the history (default ctl-<user>-<host>)
  --timeout MS    how long to wait for the reply (default 5000)

${AUTH_HELP}  status and history need the job's observer role; every other verb its operator
  (docs/SECURITY.md).
`

/** This client's id in the history: ctl-<user>-<host>, as a subject token. */
export const defaultSender = (): string => {
  let user = "user"
  try {
    user = userInfo().username
  } catch {
    // no passwd entry (containers): keep "user"
  }
  return `ctl-${user}-${hostname()}`.replace(/[^A-Za-z0-9_-]/g, "").slice(0, 64)
}

/** Send `verb` with `fields` to `job`'s controller and decode its reply. */
export const requestControl = (
  bus: BusShape,
  job: string,
  verb: ControlVerb,
  fields: Record<string, unknown> = {},
  o: { sender?: string; requestId?: string; timeoutMs?: number } = {}
) =>
  Effect.gen(function* () {
    const s = subjects(job)
    const request = makeControlRequest(verb, { job, sender: o.sender ?? defaultSender(), requestId: o.requestId ?? randomUUID(), ...fields })
    const m = yield* bus.request(s.control(verb), encodeMessage(request), { timeoutMs: o.timeoutMs ?? 5_000 })
    return yield* Effect.fromResult(decodeBytes(ControlReply, m.subject, m.data))
  })

/** A command-line value: a number, true/false, else the string (the controller says what is wrong). */
const value = (raw: string): unknown => {
  if (raw === "true") return true
  if (raw === "false") return false
  const n = Number(raw)
  return raw.trim() !== "" && !Number.isNaN(n) ? n : raw
}

/** The request fields of `verb` from its positional arguments and options. */
export const fieldsFor = (verb: ControlVerb, args: string[], opts: { fromStep?: string; limit?: string; fromVersion?: string }): Record<string, unknown> => {
  const none = () => {
    if (args.length > 0) throw new UsageError(`${verb} takes no arguments, got ${args.join(" ")}`)
    return {}
  }
  switch (verb) {
    case "status":
    case "pause":
    case "resume":
    case "stop":
    case "checkpoint":
      return none()
    case "history":
      none()
      return opts.limit === undefined ? {} : { limit: value(opts.limit) }
    case "set-lr":
      if (args.length !== 1) throw new UsageError("usage: flotilla ctl <job> set-lr LR [--from-step N]")
      return { lr: value(args[0]), ...(opts.fromStep === undefined ? {} : { fromStep: value(opts.fromStep) }) }
    case "set-schedule": {
      if (args.length !== 1) throw new UsageError(`usage: flotilla ctl <job> set-schedule '{"kind":"constant","lr":1e-3}'`)
      try {
        return { schedule: JSON.parse(args[0]) }
      } catch (e) {
        throw new UsageError(`set-schedule: the schedule is not JSON: ${(e as Error).message}`)
      }
    }
    case "set-optimizer": {
      if (args.length === 0) throw new UsageError("usage: flotilla ctl <job> set-optimizer K=V [K=V ...], e.g. beta2=0.95")
      const patch: Record<string, unknown> = {}
      for (const a of args) {
        const eq = a.indexOf("=")
        if (eq <= 0) throw new UsageError(`set-optimizer: expected K=V, got ${JSON.stringify(a)}`)
        patch[a.slice(0, eq)] = value(a.slice(eq + 1))
      }
      return { patch }
    }
    case "set-consistency": {
      const [mode, staleness, ...rest] = args.length === 1 && args[0].includes(":") ? args[0].split(":") : args
      if (mode === undefined || rest.length > 0) throw new UsageError("usage: flotilla ctl <job> set-consistency sync | async | bounded S")
      return { mode, ...(staleness === undefined ? {} : { staleness: value(staleness) }) }
    }
    case "set-compression":
      if (args.length !== 1) throw new UsageError("usage: flotilla ctl <job> set-compression f32 | bf16 | int8 | int4 | sign1 | topk:F [--from-version V]")
      return { codec: args[0], ...(opts.fromVersion === undefined ? {} : { fromVersion: value(opts.fromVersion) }) }
  }
}

// ---------------------------------------------------------------- printing

const age = (ms: number) => (ms < 10_000 ? `${(ms / 1000).toFixed(1)}s` : `${Math.round(ms / 1000)}s`)
const num = (x: number | null, digits = 4) => (x === null ? "-" : Math.abs(x) < 1e-2 && x !== 0 ? x.toExponential(2) : x.toFixed(digits))

const table = (rows: string[][]): string => {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)))
  return rows.map((r) => r.map((c, i) => c.padEnd(widths[i])).join("  ").trimEnd()).join("\n")
}

export const formatStatus = (st: JobStatus): string => {
  const rows = [["ROLE", "ID", "HOST", "HEARTBEAT", "STATE", "RESTARTS", "INFO"]]
  for (const a of st.actors) {
    const info = a.info ? Object.entries(a.info).map(([k, v]) => `${k}=${v}`).join(" ") : ""
    rows.push([a.role, a.id, a.host, `${age(a.heartbeatAgeMs)} ago`, a.state, String(a.restarts ?? 0), info])
  }
  const c = st.consistency
  const opt = Object.entries(st.optimizer).map(([k, v]) => (k === "kind" ? String(v) : `${k}=${v}`)).join(" ")
  return [
    `job ${st.job}: ${st.actors.length} actors`,
    st.actors.length > 0 ? table(rows) : "(no live actors)",
    "",
    `version      ${st.version ?? "-"}${st.shards.length > 1 ? `  (shards ${st.shards.map((x) => `${x.shard}@${x.version}`).join(" ")})` : ""}`,
    `step         ${st.step ?? "-"}`,
    `lr           ${num(st.lr)}  (${st.schedule} schedule; next step)`,
    `loss         train ${num(st.lastLoss)}  validation ${num(st.lastValLoss)}`,
    ...(st.valMetrics && st.valMetrics["accuracy"] !== undefined
      ? [`validation   ${["accuracy", "precision", "recall", "f1"].map((k) => `${k} ${num(st.valMetrics![k] ?? null)}`).join("  ")}`]
      : []),
    ...(st.epoch && (st.epoch.of > 0 || st.epoch.done > 0) ? [`epoch        ${st.epoch.done}${st.epoch.of > 0 ? ` of ${st.epoch.of}` : ""} complete`] : []),
    `consistency  ${c.mode}${c.mode === "bounded" ? ` (staleness ${c.staleness})` : ""}`,
    ...(st.compression ? [`compression  ${st.compression.codec}${st.compression.next ? ` (${st.compression.next.codec} from version ${st.compression.next.fromVersion})` : ""}`] : []),
    `optimizer    ${opt}`,
    `state        ${st.stopped ? "stopped" : st.finished ? "finished" : st.paused ? "paused" : "running"}`
  ].join("\n")
}

export const formatHistory = (h: ControlHistory): string => {
  if (h.entries.length === 0) return `job ${h.job}: no control commands yet (history in ${h.store})`
  const rows = [["#", "TIME", "SENDER", "VERB", "ARGS"]]
  for (const e of h.entries) {
    const envelope = new Set(["_tag", "v", "job", "sender", "requestId"])
    const args = Object.fromEntries(Object.entries(e.command).filter(([k]) => !envelope.has(k)))
    rows.push([String(e.seq), new Date(e.at).toISOString(), e.sender, e.verb, Object.keys(args).length ? JSON.stringify(args) : ""])
  }
  return `job ${h.job}: ${h.entries.length} commands (history in ${h.store})\n${table(rows)}`
}

// ---------------------------------------------------------------- the command

export const ctlMain = async (argv: string[]): Promise<void> => {
  // a negative number is an argument (the controller rejects a negative LR), not an option
  const negatives: string[] = []
  const safe = argv.map((a) => (/^-\.?\d/.test(a) ? `\u0000${negatives.push(a) - 1}` : a))
  const parsed = parseArgs({
    args: safe,
    options: {
      nats: { type: "string" },
      json: { type: "boolean" },
      sender: { type: "string" },
      timeout: { type: "string" },
      "from-step": { type: "string" },
      "from-version": { type: "string" },
      limit: { type: "string" },
      ...AUTH_OPTIONS,
      help: { type: "boolean", short: "h" }
    },
    allowPositionals: true,
    allowNegative: false,
    strict: true
  })
  const back = (p: string) => (p.startsWith("\u0000") ? negatives[Number(p.slice(1))] : p)
  const v = parsed.values
  for (const k of ["from-step", "from-version", "limit", "timeout"] as const) if (v[k] !== undefined) v[k] = back(v[k])
  const positionals = parsed.positionals.map(back)
  if (v.help || positionals.length === 0) return void process.stdout.write(CTL_HELP)
  const [job, verb, ...args] = positionals
  if (!isToken(job)) throw new UsageError(`job ${JSON.stringify(job)} is not a valid job name ([A-Za-z0-9_-], 1-64)`)
  if (verb === undefined) throw new UsageError(`which verb? one of ${CONTROL_VERBS.join(", ")}\n\n${CTL_HELP}`)
  if (!isControlVerb(verb)) throw new UsageError(`unknown verb ${JSON.stringify(verb)}: one of ${CONTROL_VERBS.join(", ")}`)
  const sender = v.sender ?? defaultSender()
  if (!isToken(sender)) throw new UsageError(`--sender must be 1-64 of [A-Za-z0-9_-], got ${JSON.stringify(sender)}`)
  const timeoutMs = v.timeout === undefined ? 5_000 : Number(v.timeout)
  if (!(timeoutMs > 0)) throw new UsageError(`--timeout must be a positive number of ms, got ${JSON.stringify(v.timeout)}`)
  const fields = fieldsFor(verb, args, { fromStep: v["from-step"], fromVersion: v["from-version"], limit: v.limit })
  const url = v.nats ?? process.env.NATS_URL ?? "nats://127.0.0.1:4222"
  const auth = authFromArgs(v)

  const program = Effect.gen(function* () {
    const bus = yield* Bus
    return yield* requestControl(bus, job, verb, fields, { sender, timeoutMs })
  }).pipe(
    Effect.scoped,
    Effect.provide(NatsBus.layer({ servers: url.split(","), name: `flotilla-ctl-${sender}`, connectTimeoutMs: 3_000, auth })),
    Effect.provide(loggingLayer(logLevelFromEnv("Warn")))
  )

  const r = await Effect.runPromise(Effect.result(program))
  if (Result.isFailure(r)) {
    const e = r.failure as { _tag?: string; message?: string }
    const why =
      e._tag === "NoRespondersError" || e._tag === "BusTimeoutError"
        ? `no controller answered for job ${job} on ${url} (is the job's scheduler running?)`
        : (e.message ?? String(e))
    process.stderr.write(`flotilla ctl: ${why}\n`)
    process.exitCode = 1
    return
  }
  const reply = r.success
  if (v.json) process.stdout.write(JSON.stringify(reply) + "\n")
  switch (reply._tag) {
    case "ControlRejected":
      process.stderr.write(`flotilla ctl: ${verb} rejected (${reply.code}): ${reply.reason}\n`)
      process.exitCode = 1
      return
    case "ControlAccepted":
      if (!v.json) process.stdout.write(`${verb}: accepted (#${reply.seq}, by ${reply.by})\n`)
      return
    case "JobStatus":
      if (!v.json) process.stdout.write(formatStatus(reply) + "\n")
      return
    case "ControlHistory":
      if (!v.json) process.stdout.write(formatHistory(reply) + "\n")
      return
  }
}
