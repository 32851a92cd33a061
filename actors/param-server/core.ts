/**
 * Implements: the parameter server's mailbox reducer — every decision a shard makes, as a
 * pure function `step(state, event) → effects` over a closed union of events. The shell
 * (server.ts) turns bus messages, membership changes, LR replies, control commands and a
 * timer into events on ONE queue, runs this reducer on each in turn, and performs the
 * effects it returns (data: publish, reply, broadcast params, checkpoint, roll back). Only
 * that fiber holds the state, so nothing here is locked or raced.
 *
 * The protocol it keeps (docs/PROTOCOL.md, docs/RELIABILITY.md):
 *  - every admitted push is acknowledged (`PushAck` on ps.<k>.ack.<worker>), every refused
 *    one answered with the reason there and on `errors`; a resend is idempotent;
 *  - sync, one shard: version v+1 applies the gradients of the barrier (the live workers at
 *    v, plus any other sender whose gradient is held); members that leave stop holding it;
 *  - sync, several shards: followers report what they hold (`GradientsHeld`, again on every
 *    Tick while waiting); shard 0 chooses from the gradients EVERY shard holds, so a worker
 *    killed between its pushes to two shards never stalls a follower; the choice and the LR
 *    go out as `StepDecided` (a follower that misses it asks `ps.0.decision`); with clipping
 *    each shard shares its squared norm of the aggregate (`NormShare`, re-sent while
 *    waiting) and all clip by the global norm;
 *  - bounded / async: each held gradient is applied on its own, in arrival order (with one
 *    step of delay compensation, aggregate.ts), clipped by the sender's whole-gradient norm;
 *  - a restart is a new incarnation (its start time); sync shards roll back to one version.
 * State is mutated in place (params are megabytes); `step` is pure where it matters: no
 * I/O, no clocks (time arrives in events), no randomness.
 */
import type { BusMessage } from "../../shared/bus/Bus.ts"
import type { ControlApplied } from "../../shared/protocol/control.ts"
import { rejected, type GradientsHeld, type NormShare, type StepDecided } from "../../shared/protocol/messages.ts"
import type { Rejection } from "../../shared/actor/report.ts"
import type { AppliedStep, GradientPush, Held, ShardState } from "./aggregate.ts"
import type { Subjects } from "../../shared/protocol/subjects.ts"
import * as P from "./protocol.ts"
import { control } from "./control.ts"
import { reopen, stepKept, stepRefused } from "./refuse-step.ts"
import { canStart, memberJoined, memberLeft } from "./members.ts"
import type { CodecSwitch, CompressionConfig } from "../../shared/wire/compression.ts"

export interface PsConfig {
  readonly subjects: Subjects
  readonly job: string
  readonly id: string
  readonly shard: number
  readonly shards: number
  readonly steps: number
  /** the job also ends once this many epochs are complete in the applied log (0 = no limit). */
  readonly epochs: number
  readonly checkpointEvery: number
  /** the first version waits until this many workers are live. */
  readonly minWorkers: number
  /** a follower asks shard 0 for a decision it has waited this long for. */
  readonly decisionWaitMs: number
  /** how often a waiting shard re-sends what its peers may have missed. */
  readonly resendMs: number
  /** a resumed (or rolled-back) shard's first version waits this long at most for workers to show up (livenessMs). */
  readonly joinGraceMs: number
  /** the job's compression policy (train.compression): the params encoding and the gradient codec stamped on each version. */
  readonly compression?: CompressionConfig
}

type Phase =
  | { readonly _tag: "Idle" }
  /** asked the scheduler for the LR of `version - 1`; `pushes` will make `version`. */
  | { readonly _tag: "AwaitingLr"; readonly version: number; readonly pushes: readonly Held[] }
  /** sync, several shards, clipping: waiting for every shard's squared norm. */
  | { readonly _tag: "AwaitingNorms"; readonly version: number; readonly pushes: readonly Held[]; readonly lr: number; readonly sumSq: number; sentAt: number }

export interface PsState {
  readonly cfg: PsConfig
  core: ShardState
  incarnation: number
  /** live workers (membership): the ones the barrier waits for (relays included, relayed workers not). */
  readonly members: Set<string>
  /** live relayed workers and relays: what the first step's `minWorkers` counts besides `members`. */
  readonly relayed: Set<string>
  readonly relays: Set<string>
  /** sync leader: who the open version waits for. */
  barrier: Set<string>
  started: boolean
  /** when this shard resumed from a checkpoint (its first version waits for the workers to be heard). */
  resumedAt?: number
  paused: boolean
  stopped: boolean
  done: boolean
  /** batches per epoch, from the gradients' GradMeta (0 until one says). */
  epochBatches: number
  phase: Phase
  /** leader: what each follower holds for its version. */
  readonly heldBy: Map<number, GradientsHeld>
  /** leader: its recent decisions; follower: decisions received (a few). */
  readonly decisions: Map<number, StepDecided>
  /** norm shares of the version in AwaitingNorms, by shard; and this shard's recent own shares. */
  readonly norms: Map<number, number>
  readonly ownShares: Map<number, number>
  /** what this shard knows of each peer shard. */
  readonly peers: Map<number, { incarnation: number; version: number }>
  /** shard 0: the scheduler state of the newest LR reply (checkpointed). */
  schedule: unknown
  /** follower: when it began waiting for the decision of the open version; when it last re-sent. */
  waitingSince: number
  lastResend: number
  /** when the last update was applied (or the last "waiting" report made). */
  lastProgress: number
  now: number
  rollingBack: boolean
  /** accepted `set-compression`s (checkpointed): the codec stamped on version v is gradCodecAt(cfg.compression, these, v). */
  codecSwitches: CodecSwitch[]
  /** the run this shard's params belong to: its first incarnation (checkpointed; a resume keeps it, a fresh start makes a new one). */
  readonly run: number
}

export type PsEvent =
  | { readonly _tag: "GradientsReceived"; readonly push: GradientPush; readonly incarnation: number; readonly subject: string }
  /** `relayed`: a worker that pushes through a relay (not waited for itself); `relay`: a relay (waited for, not counted as a worker). */
  | { readonly _tag: "MemberJoined"; readonly id: string; readonly relayed?: boolean; readonly relay?: boolean }
  | { readonly _tag: "MemberLeft"; readonly id: string; readonly why: string }
  | { readonly _tag: "PeerSeen"; readonly shard: number; readonly incarnation: number; readonly version: number }
  | { readonly _tag: "HeldReported"; readonly msg: GradientsHeld }
  | { readonly _tag: "Decided"; readonly msg: StepDecided }
  | { readonly _tag: "NormShared"; readonly msg: NormShare }
  | { readonly _tag: "LrResolved"; readonly version: number; readonly lr: number; readonly schedule?: unknown }
  | { readonly _tag: "PullRequested"; readonly reply: BusMessage }
  | { readonly _tag: "LogRequested"; readonly reply: BusMessage }
  | { readonly _tag: "DecisionRequested"; readonly reply: BusMessage; readonly version: number }
  | { readonly _tag: "ControlApplied"; readonly event: ControlApplied }
  | { readonly _tag: "Restored"; readonly core: ShardState; readonly schedule: unknown; readonly incarnation: number; readonly from: string }
  | { readonly _tag: "Tick"; readonly now: number }

export type PsEffect =
  | { readonly _tag: "Publish"; readonly subject: string; readonly message: object }
  | { readonly _tag: "Reply"; readonly to: BusMessage; readonly message: object }
  | { readonly _tag: "ReplyParams"; readonly to: BusMessage }
  | { readonly _tag: "BroadcastParams" }
  /** `epoch`: the data epoch of the batches that will make version + 1 (per-epoch schedules). */
  | { readonly _tag: "RequestLr"; readonly version: number; readonly epoch: number }
  | { readonly _tag: "RequestDecision"; readonly version: number }
  | { readonly _tag: "Reject"; readonly rejection: Rejection; readonly replyTo?: BusMessage; readonly ackTo?: string }
  | { readonly _tag: "Applied"; readonly step: AppliedStep; readonly final: boolean }
  | { readonly _tag: "Checkpoint"; readonly why: string }
  | { readonly _tag: "Rollback"; readonly atMost: number; readonly why: string }
  | { readonly _tag: "Finished" }
  | { readonly _tag: "Log"; readonly level: "info" | "warn"; readonly message: string }

export const initialState = (cfg: PsConfig, core: ShardState, o: { incarnation: number; schedule?: unknown; now: number; codecSwitches?: readonly CodecSwitch[]; run?: number }): PsState => {
  const s: PsState = {
  cfg,
  core,
  incarnation: o.incarnation,
  members: new Set(),
  relayed: new Set(),
  relays: new Set(),
  barrier: new Set(),
  started: false,
  resumedAt: core.version > 0 ? o.now : undefined,
  paused: false,
  stopped: false,
  done: false,
  epochBatches: 0,
  phase: { _tag: "Idle" },
  heldBy: new Map(),
  decisions: new Map(),
  norms: new Map(),
  ownShares: new Map(),
  peers: new Map(),
  schedule: o.schedule,
  waitingSince: o.now,
  lastResend: o.now,
  lastProgress: o.now,
  now: o.now,
  rollingBack: false,
  codecSwitches: [...(o.codecSwitches ?? [])],
  run: o.run ?? o.incarnation
  }
  s.done = finished(s)
  return s
}

const isSync = (s: PsState) => s.core.consistency.mode === "sync", isLeader = (s: PsState) => s.cfg.shard === 0
/** sync with several shards: the shards agree on every version through shard 0. */
const coordinated = (s: PsState) => isSync(s) && s.cfg.shards > 1
const key = (sender: string, batchId: string) => `${sender}|${batchId}`
const keepRecent = <V>(m: Map<number, V>, n: number) => [...m.keys()].sort((a, b) => a - b).slice(0, Math.max(0, m.size - n)).forEach((k) => m.delete(k))

export const step = (s: PsState, e: PsEvent): PsEffect[] => {
  const out: PsEffect[] = []
  switch (e._tag) {
    case "GradientsReceived": {
      const p = e.push
      const refuse = (code: Rejection["code"], reason: string) =>
        out.push({ _tag: "Reject", rejection: { code, reason, subject: e.subject, sender: p.sender, step: p.version }, ackTo: p.sender })
      if (s.done) refuse("stale", `the job finished at version ${s.core.version}`)
      else if (s.rollingBack) refuse("stale", `shard ${s.cfg.shard} is rolling back to a checkpoint; push again on the new params`)
      else if (e.incarnation !== s.incarnation) {
        refuse("stale", `computed on params of server incarnation ${e.incarnation}; shard ${s.cfg.shard} is now incarnation ${s.incarnation} (it restarted)`)
      } else {
        const a = s.core.admit(p, (h) => isChosen(s, h))
        if (!a.ok) refuse(a.code, a.reason)
        else {
          out.push({ _tag: "Publish", subject: s.cfg.subjects.psAck(s.cfg.shard, p.sender), message: P.pushAck(s, p, a.already === "applied" ? "applied" : "held") })
          if (coordinated(s) && !isLeader(s) && a.already === undefined) {
            if (s.core.heldCount === 1) s.waitingSince = s.now // the decision of the open version is awaited from now
            out.push(heldReport(s))
          }
        }
        // sync: a sender whose push holds nothing here (refused, or applied already) waits for
        // the next version, so the barrier stops waiting for it (else every shard stalls)
        if ((!a.ok || a.already === "applied") && isSync(s) && p.version === s.core.version && !s.core.heldList().some((h) => h.sender === p.sender)) {
          s.barrier.delete(p.sender)
        }
      }
      break
    }
    case "MemberJoined":
      memberJoined(s, e)
      break
    case "MemberLeft":
      if (memberLeft(s, e.id)) out.push({ _tag: "Log", level: "info", message: `worker ${e.id} left (${e.why}); the barrier waits for [${waitingFor(s)}]` })
      break
    case "PeerSeen":
      peerSeen(s, e.shard, e.incarnation, e.version, out)
      break
    case "HeldReported":
      if (isLeader(s) && e.msg.shard !== 0) {
        peerSeen(s, e.msg.shard, e.msg.incarnation, e.msg.version, out)
        s.heldBy.set(e.msg.shard, e.msg)
      }
      break
    case "Decided": {
      if (isLeader(s) || !coordinated(s)) break
      const d = e.msg
      peerSeen(s, 0, d.incarnation, d.version - 1, out)
      if (d.version > s.core.version && d.incarnation === s.peers.get(0)?.incarnation) {
        s.decisions.set(d.version, d)
        keepRecent(s.decisions, 4)
      }
      break
    }
    case "NormShared": {
      const m = e.msg
      if (m.shard === s.cfg.shard) break
      const ph = s.phase
      if (ph._tag === "AwaitingNorms" && m.version === ph.version) {
        s.norms.set(m.shard, m.sumSq)
        completeNorms(s, out)
      } else if (m.version === s.core.version + 1 && !s.decisions.has(m.version) && !isLeader(s) && coordinated(s)) {
        // peers already share norms for a version this follower has no decision for: it missed the StepDecided
        out.push({ _tag: "RequestDecision", version: m.version })
      } else if (m.version <= s.core.version && s.ownShares.has(m.version) && m.echo !== true) {
        // a peer still waits for a version this shard already applied: it missed our share.
        // The answer is an echo, which no shard answers: two shards that both applied the
        // version would otherwise answer each other's answers for ever (measured: ~1,000
        // messages a second per shard, starving the mailbox, once a stray resend crossed)
        out.push({ _tag: "Publish", subject: s.cfg.subjects.psNorm(s.cfg.shard), message: P.normShare(s, m.version, s.ownShares.get(m.version)!, true) })
      }
      break
    }
    case "LrResolved": {
      const ph = s.phase
      if (ph._tag !== "AwaitingLr" || ph.version !== e.version) break
      if (e.schedule !== undefined && isLeader(s)) s.schedule = e.schedule
      if (s.paused || s.done) {
        // paused (or stopped) while asking: apply nothing; on resume the gradients are still held
        s.phase = { _tag: "Idle" }
        break
      }
      if (coordinated(s) && isLeader(s)) {
        const d = P.stepDecided(s, ph.version, ph.pushes, e.lr)
        s.decisions.set(d.version, d)
        keepRecent(s.decisions, 8)
        out.push({ _tag: "Publish", subject: s.cfg.subjects.psDecided, message: d })
        s.phase = { _tag: "Idle" }
        break // followed below, like every shard does
      }
      s.phase = { _tag: "Idle" }
      applyOrShare(s, ph.version, ph.pushes, e.lr, out)
      break
    }
    case "PullRequested":
      out.push({ _tag: "ReplyParams", to: e.reply })
      break
    case "LogRequested":
      out.push({ _tag: "Reply", to: e.reply, message: P.appliedLog(s) })
      break
    case "DecisionRequested": {
      const d = s.decisions.get(e.version)
      if (d) out.push({ _tag: "Reply", to: e.reply, message: d })
      // not decided yet: said to the asker only (it asks again), not a fault for the errors feed
      else out.push({ _tag: "Reply", to: e.reply, message: rejected({ code: "unknown-batch", reason: `shard 0 has no decision for version ${e.version} (it is at ${s.core.version})`, subject: e.reply.subject, by: s.cfg.id }) })
      break
    }
    case "ControlApplied":
      control(s, e.event, out)
      break
    case "Restored": {
      s.core = e.core
      s.incarnation = e.incarnation
      s.schedule = e.schedule
      s.rollingBack = false
      s.phase = { _tag: "Idle" }
      s.heldBy.clear()
      s.decisions.clear()
      s.norms.clear()
      s.ownShares.clear()
      s.barrier = new Set(s.members)
      s.started = false
      s.resumedAt = s.now
      s.done = finished(s)
      out.push({ _tag: "Log", level: "warn", message: `shard ${s.cfg.shard} rolled back to version ${s.core.version} (${e.from}); incarnation ${s.incarnation}` })
      out.push({ _tag: "BroadcastParams" })
      break
    }
    case "Tick":
      s.now = e.now
      tick(s, out)
      break
  }
  progress(s, out)
  return out
}

/** A held gradient already chosen for the next version (in the update under way, or shard 0's decision). */
const isChosen = (s: PsState, h: Held): boolean => {
  const ph = s.phase
  if (ph._tag !== "Idle" && ph.pushes.includes(h)) return true
  const d = s.decisions.get(s.core.version + 1)
  return d !== undefined && d.chosen.some((c) => c.sender === h.sender && c.batchId === h.batchId)
}

export const waitingFor = (s: PsState): string[] => [...s.barrier].filter((m) => !s.core.heldList().some((h) => h.sender === m)).sort()

const heldReport = (s: PsState): PsEffect => ({ _tag: "Publish", subject: s.cfg.subjects.psHeld(s.cfg.shard), message: P.gradientsHeld(s) })

const peerSeen = (s: PsState, shard: number, incarnation: number, version: number, out: PsEffect[]) => {
  if (shard === s.cfg.shard) return
  const known = s.peers.get(shard)
  s.peers.set(shard, { incarnation, version: Math.max(version, known?.incarnation === incarnation ? known.version : version) })
  if (!coordinated(s) || s.rollingBack) return
  const restarted = known !== undefined && incarnation > known.incarnation
  // Sync shards must be at one version: a peer back below this shard's version, or behind
  // the checkpoint this shard just resumed from, makes it roll back to its checkpoint ≤ it.
  if ((restarted || (s.resumedAt !== undefined && !s.started)) && version < s.core.version) {
    s.rollingBack = true
    s.phase = { _tag: "Idle" }
    out.push({ _tag: "Rollback", atMost: version, why: `shard ${shard} is at version ${version}${restarted ? " after a restart" : ""}` })
    return
  }
  if (!restarted) return
  // A peer back at (or past) this shard's version: what was under way beyond it involved
  // its old process (held gradients, a norm share): decide that again
  for (const v of [...s.decisions.keys()]) if (v > version) s.decisions.delete(v)
  s.heldBy.delete(shard)
  if (s.phase._tag !== "Idle" && s.phase.version > version) {
    s.phase = { _tag: "Idle" }
    s.norms.clear()
  }
  out.push({ _tag: "Log", level: "info", message: `shard ${shard} restarted at version ${version}: what comes after it is decided again` })
}

/** The gradients a coordinated version may use: held here and, per the followers' reports, everywhere. */
const heldEverywhere = (s: PsState): Held[] =>
  s.core.heldList().filter((h) => {
    for (let k = 1; k < s.cfg.shards; k++) {
      const r = s.heldBy.get(k)
      const peer = s.peers.get(k)
      if (!r || r.version !== s.core.version || r.incarnation !== peer?.incarnation) return false
      if (!r.held.some((x) => key(x.sender, x.batchId) === key(h.sender, h.batchId))) return false
    }
    return true
  })

/** Start the next update when its inputs are there (called after every event). */
const progress = (s: PsState, out: PsEffect[]) => {
  if (s.done || s.paused || s.rollingBack || s.phase._tag !== "Idle") return
  if (!isSync(s)) {
    if (!canStart(s)) return
    const h = s.core.next()
    if (!h) return
    s.started = true
    s.phase = { _tag: "AwaitingLr", version: s.core.version + 1, pushes: [h] }
    out.push({ _tag: "RequestLr", version: s.core.version, epoch: epochOf([h]) })
    return
  }
  if (coordinated(s)) {
    // every shard: apply the decision for the next version once it holds the chosen gradients
    const d = s.decisions.get(s.core.version + 1)
    if (d) {
      const pushes = d.chosen.map((c) => s.core.heldList().find((h) => h.sender === c.sender && h.batchId === c.batchId))
      if (pushes.every((p) => p !== undefined)) {
        // a follower is running once it applies a decision: from here a leader heartbeat a
        // version behind is one in flight, not a reason to roll back
        s.started = true
        applyOrShare(s, d.version, pushes as Held[], d.lr, out)
        return
      }
    }
    if (!isLeader(s) || s.decisions.has(s.core.version + 1)) return
  }
  // the leader (or the only shard) decides
  if (!canStart(s)) return
  const candidates = coordinated(s) ? heldEverywhere(s) : [...s.core.heldList()]
  if (candidates.length === 0) return
  for (const m of s.barrier) if (!candidates.some((h) => h.sender === m)) return
  s.started = true
  const pushes = s.core.choose(candidates.map((h) => h.sender))
  s.phase = { _tag: "AwaitingLr", version: s.core.version + 1, pushes }
  out.push({ _tag: "RequestLr", version: s.core.version, epoch: epochOf(pushes) })
}

/** Apply now, or (sync, several shards, clipping) share this shard's norm first. */
const applyOrShare = (s: PsState, version: number, pushes: readonly Held[], lr: number, out: PsEffect[]) => {
  if (coordinated(s) && s.core.clipNorm > 0) {
    const { sumSq } = s.core.aggregate(pushes)
    s.norms.clear()
    s.norms.set(s.cfg.shard, sumSq)
    s.ownShares.set(version, sumSq)
    keepRecent(s.ownShares, 4)
    s.phase = { _tag: "AwaitingNorms", version, pushes, lr, sumSq, sentAt: s.now }
    out.push({ _tag: "Publish", subject: s.cfg.subjects.psNorm(s.cfg.shard), message: P.normShare(s, version, sumSq) })
    return
  }
  const single = pushes.length === 1 && s.cfg.shards > 1 && !isSync(s) && (pushes[0].normSq ?? -1) >= 0 ? pushes[0].normSq : undefined
  finishApply(s, pushes, lr, single, out)
}

const finishApply = (s: PsState, pushes: readonly Held[], lr: number, globalSumSq: number | undefined, out: PsEffect[]) => {
  // all or nothing (aggregate.ts): a step whose params would not be finite is refused (refuse-step.ts)
  const r = s.core.applyChecked(lr, pushes, globalSumSq, coordinated(s) ? "keep" : "refuse")
  if (r.refused) return stepRefused(s, r.refused, out)
  const { step, dropped } = r
  if (r.kept !== undefined) stepKept(s, r.kept, out)
  for (const p of pushes) if ((p.epochBatches ?? 0) > 0) s.epochBatches = p.epochBatches!
  reopen(s)
  s.done = finished(s)
  for (const d of dropped) {
    out.push({
      _tag: "Reject", ackTo: d.sender,
      rejection: { code: "stale", reason: `version ${step.version} was made without this gradient (batch ${d.batchId})`, subject: s.cfg.subjects.psPush(s.cfg.shard, d.sender), sender: d.sender, step: d.version }
    })
  }
  out.push({ _tag: "BroadcastParams" })
  // bounded/async: tell each sender its gradient is applied — it computes its next one only
  // then (worker core.ts pushDone), so the held queue stays at most one gradient per worker
  if (!isSync(s)) for (const p of pushes) out.push({ _tag: "Publish", subject: s.cfg.subjects.psAck(s.cfg.shard, p.sender), message: P.pushAck(s, p, "applied") })
  out.push({ _tag: "Publish", subject: s.cfg.subjects.psApplied(s.cfg.shard), message: P.stepApplied(s, step, s.done, epochOf(pushes)) })
  out.push({ _tag: "Applied", step, final: s.done })
  if (s.done) out.push({ _tag: "Checkpoint", why: "final version" }, { _tag: "Finished" })
  else if (s.cfg.checkpointEvery > 0 && step.version % s.cfg.checkpointEvery === 0) out.push({ _tag: "Checkpoint", why: `every ${s.cfg.checkpointEvery}` })
}

/** The job is over: its last step, or (train.epochs) its last epoch complete in the applied log. */
const finished = (s: PsState): boolean => s.core.version >= s.cfg.steps || (s.cfg.epochs > 0 && s.core.log.openFrom >= s.cfg.epochs)

/** The data epoch of a version's batches: the newest among them. */
const epochOf = (pushes: readonly Held[]): number => {
  let e = 0
  for (const p of pushes) for (const r of p.micro) e = Math.max(e, r.epoch)
  return e
}

const STALL_REPORT_MS = 10_000 // nothing applied for this long (not paused): say what the shard waits for

const tick = (s: PsState, out: PsEffect[]) => {
  if (!s.done && !s.paused && s.now - s.lastProgress >= STALL_REPORT_MS) {
    s.lastProgress = s.now
    out.push({ _tag: "Log", level: "warn", message: `no update for ${STALL_REPORT_MS / 1000} s: ${P.describeWait(s)}` })
  }
  const ph = s.phase
  if (ph._tag === "AwaitingNorms") {
    completeNorms(s, out)
    if (s.phase._tag !== "AwaitingNorms") return
    if (s.now - ph.sentAt >= s.cfg.resendMs) {
      ph.sentAt = s.now
      out.push({ _tag: "Publish", subject: s.cfg.subjects.psNorm(s.cfg.shard), message: P.normShare(s, ph.version, ph.sumSq) })
      // the leader says its decision again too: a follower that missed it cannot share its norm
      const d = isLeader(s) ? s.decisions.get(ph.version) : undefined
      if (d) out.push({ _tag: "Publish", subject: s.cfg.subjects.psDecided, message: d })
    }
    return
  }
  if (!coordinated(s) || isLeader(s) || s.done || s.core.heldCount === 0) return
  // a follower holding gradients with no decision yet: say again what it holds, and ask
  // shard 0 for the decision once it is overdue (the StepDecided may have been lost)
  if (s.now - s.lastResend >= s.cfg.resendMs) {
    s.lastResend = s.now
    out.push(heldReport(s))
    if (s.now - s.waitingSince >= s.cfg.decisionWaitMs) out.push({ _tag: "RequestDecision", version: s.core.version + 1 })
  }
}

const completeNorms = (s: PsState, out: PsEffect[]) => {
  const ph = s.phase
  if (ph._tag !== "AwaitingNorms" || s.paused) return
  let total = 0
  for (let k = 0; k < s.cfg.shards; k++) total += s.norms.get(k) ?? Number.NaN
  if (!Number.isNaN(total)) finishApply(s, ph.pushes, ph.lr, total, out)
}
