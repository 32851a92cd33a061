/**
 * Implements: who a parameter-server shard waits for — the membership part of its mailbox
 * reducer (core.ts): a live worker joins the barrier (at once before the first update, else
 * from the next version) and leaves it; a relayed worker (it pushes through a quantizer
 * relay: its heartbeat says `relay`) is not waited for, its relay is (`relay-<name>`, a
 * worker to the shard); and the first version waits for the job's `minWorkers`, counting
 * relayed workers and not relays. Mutates the state like the rest of the reducer; pure.
 * Does not own: heartbeats and liveness (shared/actor/membership.ts), the barrier's use (core.ts).
 */
import type { PsEvent, PsState } from "./core.ts"

export const memberJoined = (s: PsState, e: Extract<PsEvent, { _tag: "MemberJoined" }>): void => {
  if (e.relayed) {
    s.relayed.add(e.id)
    return
  }
  if (e.relay) s.relays.add(e.id)
  s.members.add(e.id)
  // before the first update every live worker is in the barrier; later, a worker that
  // joins is in the barrier of the next version
  if (!s.started) s.barrier = new Set(s.members)
}

/** A member left; false when it was a relayed worker (nobody waited for it). */
export const memberLeft = (s: PsState, id: string): boolean => {
  if (s.relayed.delete(id)) return false
  s.relays.delete(id)
  s.members.delete(id)
  s.barrier.delete(id)
  return true
}

/**
 * The first version waits for the workers: all `minWorkers` of them on a fresh start; after
 * a resume or rollback, those heard within `joinGraceMs` (some may be gone for good), so
 * the first version after a restart is not made of whoever pushed first.
 */
export const canStart = (s: PsState): boolean =>
  s.started || s.members.size - s.relays.size + s.relayed.size >= s.cfg.minWorkers || (s.resumedAt !== undefined && s.now - s.resumedAt >= s.cfg.joinGraceMs)
