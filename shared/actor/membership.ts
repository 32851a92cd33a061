/**
 * Implements: heartbeats out and membership in — who is alive in a job, by role.
 *
 * Every actor publishes a `Heartbeat` on `hb.<role>.<id>` every `heartbeatMs`, and one
 * with state `leaving` when its scope closes (a clean SIGTERM), so barriers drop it at
 * once instead of after `livenessMs` of silence. `Membership` is the pure table; 
 * `trackMembership` keeps one up to date from the bus and reports joins and leaves.
 */
import { hostname } from "node:os"
import { Effect, Result, Schedule, Scope } from "effect"
import { Bus } from "../bus/Bus.ts"
import { decodeBytes, encodeMessage } from "../protocol/decode.ts"
import { Heartbeat } from "../protocol/messages.ts"
import type { Role, Subjects } from "../protocol/subjects.ts"
import { PROTOCOL_VERSION } from "../protocol/subjects.ts"

export interface Member {
  readonly role: Role
  readonly id: string
  readonly host: string
  readonly pid: number
  readonly startedAt: number
  readonly lastSeen: number
  readonly state: Heartbeat["state"]
  readonly info?: Heartbeat["info"]
  /** times its supervisor restarted it (0 when its heartbeats do not say). */
  readonly restarts?: number
}

export type MembershipEvent = { readonly kind: "joined" | "left"; readonly member: Member; readonly why: string }

/** The pure membership table: `observe` heartbeats, `sweep` the silent ones. */
export class Membership {
  private readonly members = new Map<string, Member>()
  readonly livenessMs: number
  constructor(livenessMs: number) {
    this.livenessMs = livenessMs
  }

  private key = (role: string, id: string) => `${role}/${id}`

  /**
   * A heartbeat in: a new member joins; one whose process changed (same id, another
   * `startedAt` or pid: it crashed and was relaunched faster than `livenessMs`) leaves and
   * joins again, so whatever its old process held is let go at once.
   */
  observe(hb: Heartbeat, now: number): MembershipEvent[] {
    const k = this.key(hb.role, hb.id)
    const known = this.members.get(k)
    if (hb.state === "leaving") {
      if (!known || known.startedAt !== hb.startedAt) return []
      this.members.delete(k)
      return [{ kind: "left", member: known, why: "left cleanly" }]
    }
    const m: Member = { ...hb, lastSeen: now }
    this.members.set(k, m)
    if (!known) return [{ kind: "joined", member: m, why: "first heartbeat" }]
    if (known.startedAt !== hb.startedAt || known.pid !== hb.pid) {
      return [{ kind: "left", member: known, why: `restarted (pid ${known.pid} → ${hb.pid})` }, { kind: "joined", member: m, why: "restarted" }]
    }
    return []
  }

  sweep(now: number): MembershipEvent[] {
    const out: MembershipEvent[] = []
    for (const [k, m] of this.members) {
      if (now - m.lastSeen > this.livenessMs) {
        this.members.delete(k)
        out.push({ kind: "left", member: m, why: `silent for ${now - m.lastSeen} ms` })
      }
    }
    return out
  }

  /** Live members of a role, sorted by id (the fixed order gradients are summed in). */
  live(role: Role): Member[] {
    return [...this.members.values()].filter((m) => m.role === role).sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0))
  }

  isLive = (role: Role, id: string) => this.members.has(this.key(role, id))
  all = (): Member[] => [...this.members.values()]
}

/** Subscribe to a job's heartbeats and keep `membership` current. */
export const trackMembership = (
  s: Subjects,
  livenessMs: number,
  onChange: (e: MembershipEvent) => Effect.Effect<void> = () => Effect.void
): Effect.Effect<Membership, never, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const membership = new Membership(livenessMs)
    yield* bus
      .subscribe(s.hbAll, (m) => {
        const hb = decodeBytes(Heartbeat, m.subject, m.data)
        if (Result.isFailure(hb)) return Effect.logWarning(hb.failure.message)
        return Effect.forEach(membership.observe(hb.success, Date.now()), onChange, { discard: true })
      })
      .pipe(Effect.orDie)
    yield* Effect.forkScoped(
      Effect.suspend(() => Effect.forEach(membership.sweep(Date.now()), onChange, { discard: true })).pipe(
        Effect.repeat(Schedule.spaced(Math.max(50, Math.floor(livenessMs / 4))))
      )
    )
    return membership
  })

export interface HeartbeatHandle {
  setState(state: "running" | "paused"): void
  setInfo(info: Record<string, string | number>): void
}

/** How many times a supervisor restarted this process: $FLOTILLA_RESTARTS (set by `flotilla up`), 0 when absent. */
export const restartsFromEnv = (env: NodeJS.ProcessEnv = process.env): number => {
  const n = Number(env.FLOTILLA_RESTARTS ?? 0)
  return Number.isInteger(n) && n >= 0 ? n : 0
}

/** Publish heartbeats until the scope closes, then one `leaving`. The count of restarts goes in each. */
export const runHeartbeat = (
  s: Subjects,
  role: Role,
  id: string,
  intervalMs: number,
  /** info from the first beat on (e.g. a relayed worker's `relay`, which decides who counts it). */
  initialInfo: Record<string, string | number> = {}
): Effect.Effect<HeartbeatHandle, never, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const startedAt = Date.now()
    const restarts = restartsFromEnv()
    let seq = 0
    let state: "running" | "paused" | "leaving" = "running"
    let info: Record<string, string | number> = { ...initialInfo }
    const beat = Effect.suspend(() =>
      bus.publish(
        s.hb(role, id),
        encodeMessage({
          _tag: "Heartbeat",
          v: PROTOCOL_VERSION,
          role,
          id,
          host: hostname(),
          pid: process.pid,
          startedAt,
          seq: seq++,
          state,
          info,
          restarts
        } satisfies Heartbeat)
      )
    ).pipe(Effect.ignore)
    yield* beat
    yield* Effect.forkScoped(beat.pipe(Effect.repeat(Schedule.spaced(intervalMs))))
    yield* Effect.addFinalizer(() =>
      Effect.suspend(() => {
        state = "leaving"
        return beat.pipe(Effect.andThen(bus.flush()), Effect.ignore)
      })
    )
    return {
      setState: (st) => void (state = st),
      setInfo: (i) => void (info = i)
    }
  })
