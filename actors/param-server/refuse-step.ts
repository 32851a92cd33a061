/**
 * Implements: what a shard does when an optimizer step would make its params non-finite
 * (aggregate.ts applyChecked put them back) — part of the mailbox reducer (core.ts calls
 * it). Alone, or in bounded/async mode: the version is not made; every push of it is
 * refused `non-finite` to its sender and on `errors` (the worker gives the batch back, the
 * loader counts it against the batch and gives up one that keeps failing), the barrier opens
 * again on the same version, and the job goes on with the next gradients. In a coordinated
 * sync job (several shards, shard 0 decides) the peers make the version whatever this
 * shard does, so refusing here would leave the shards at two versions for ever: the
 * version is made with this shard's params kept, and that is reported on `errors`.
 * Does not own: the arithmetic (aggregate.ts), the rest of the reducer (core.ts).
 */
import type { Held } from "./aggregate.ts"
import type { PsEffect, PsState } from "./core.ts"

/** After a step (made or refused): idle, the barrier reopened on the members, the clocks restarted. */
export const reopen = (s: PsState): void => {
  s.phase = { _tag: "Idle" }
  s.barrier = new Set(s.members)
  s.waitingSince = s.now
  s.lastProgress = s.now
}

/** The version was not made: refuse its pushes, and wait for the barrier again. */
export const stepRefused = (s: PsState, r: { readonly reason: string; readonly pushes: readonly Held[] }, out: PsEffect[]): void => {
  reopen(s)
  out.push({ _tag: "Log", level: "warn", message: `version ${s.core.version + 1} refused, the params stay at version ${s.core.version}: ${r.reason}` })
  for (const p of r.pushes) {
    out.push({
      _tag: "Reject", ackTo: p.sender,
      rejection: { code: "non-finite", reason: `version ${s.core.version + 1} was not made (its params would not be finite): ${r.reason}; batch ${p.batchId}`, subject: s.cfg.subjects.psPush(s.cfg.shard, p.sender), sender: p.sender, step: p.version }
    })
  }
}

/** Coordinated sync: the version was made with this shard's params unchanged. */
export const stepKept = (s: PsState, reason: string, out: PsEffect[]): void => {
  out.push({
    _tag: "Reject",
    rejection: { code: "non-finite", reason: `shard ${s.cfg.shard} kept its params for version ${s.core.version} (its peers applied it): ${reason}`, subject: s.cfg.subjects.psPushAny(s.cfg.shard), step: s.core.version }
  })
}
