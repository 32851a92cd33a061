/**
 * Implements: the checks of a control command that need no live state — the same rules
 * for the controller (before it accepts a request) and for every actor's control listener
 * (before it acts on a `ControlApplied` event): an LR finite in [0, MAX_LR], a schedule
 * that resolves (its LRs bounded the same way), a non-empty optimizer patch of finite
 * numbers, a staleness exactly for bounded consistency, a codec of the registry with the
 * version it starts at; and, for an event, that its command is the verb's and belongs to
 * its job and its sender. Pure.
 * Does not own: checks against the job's live state (actors/controller/controller.ts
 * validateCommand: setHyperparams against the running optimizer, a set-compression version
 * already passed), what an actor does on a command.
 */
import { Result } from "effect"
import { resolveSchedule, type ScheduleInput } from "../schedule/schedules.ts"
import { parseCodec } from "../wire/codecs.ts"
import { CONTROL_REQUESTS, type ControlApplied, type ControlCommand } from "./control.ts"
import { lrProblem } from "./limits.ts"
import type { ErrorCode } from "./messages.ts"

export interface CommandProblem {
  readonly code: ErrorCode
  readonly reason: string
}

const invalid = (reason: string): CommandProblem => ({ code: "invalid-value", reason })

/** Why `c` cannot be applied whatever the job's state, or undefined. */
export const commandProblem = (c: ControlCommand): CommandProblem | undefined => {
  switch (c._tag) {
    case "SetLr": {
      const p = lrProblem(c.lr)
      return p === undefined ? undefined : invalid(p)
    }
    case "SetSchedule": {
      const r = resolveSchedule(c.schedule as unknown as ScheduleInput)
      return Result.isFailure(r) ? invalid(r.failure.message) : undefined
    }
    case "SetOptimizer": {
      const keys = Object.keys(c.patch)
      if (keys.length === 0) return invalid("the optimizer patch is empty: give field=value pairs")
      const bad = keys.find((k) => typeof c.patch[k] === "number" && !Number.isFinite(c.patch[k]))
      return bad === undefined ? undefined : invalid(`optimizer ${bad} must be a finite number, got ${c.patch[bad]}`)
    }
    case "SetConsistency":
      if (c.mode === "bounded" && c.staleness === undefined) return invalid("bounded consistency needs a staleness (an integer >= 0)")
      if (c.mode !== "bounded" && c.staleness !== undefined) return invalid(`staleness is only for bounded consistency, not ${c.mode}`)
      return undefined
    case "SetCompression": {
      const codec = parseCodec(c.codec)
      if (Result.isFailure(codec)) return invalid(codec.failure)
      return c.fromVersion === undefined ? invalid("set-compression needs the version it starts at (fromVersion)") : undefined
    }
    default:
      return undefined
  }
}

/** A controller's id: `<scheduler id>-controller` (cli/topology.ts controllerIdOf). */
export const CONTROLLER_ID = /^[A-Za-z0-9_-]{1,53}-controller$/

/**
 * Why an event on `events.control` is not one this job's controller issued, or undefined:
 * `by` must be a controller's id, its command the verb's, of this job and of the event's
 * sender and request, and the command must pass `commandProblem`.
 */
export const eventProblem = (ev: ControlApplied, job: string): CommandProblem | undefined => {
  if (!CONTROLLER_ID.test(ev.by)) return { code: "bad-message", reason: `control event #${ev.seq} claims to be from ${JSON.stringify(ev.by)}, which is not a controller id (<scheduler-id>-controller)` }
  const tag = CONTROL_REQUESTS[ev.verb].fields._tag.literal
  if (ev.command._tag !== tag) return { code: "bad-message", reason: `control event #${ev.seq} is a ${ev.verb} carrying a ${ev.command._tag} (expected ${tag})` }
  if (ev.command.job !== job || ev.job !== job) return { code: "wrong-job", reason: `control event #${ev.seq} is for job ${JSON.stringify(ev.command.job)}, this is ${JSON.stringify(job)}` }
  if (ev.command.sender !== ev.sender || ev.command.requestId !== ev.requestId) {
    return { code: "bad-message", reason: `control event #${ev.seq}: its command's sender/request (${ev.command.sender}/${ev.command.requestId}) are not the event's (${ev.sender}/${ev.requestId})` }
  }
  return commandProblem(ev.command)
}
