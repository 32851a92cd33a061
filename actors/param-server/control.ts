/**
 * Implements: what a control command does to a parameter-server shard (pause, resume,
 * checkpoint, stop, set-optimizer, set-consistency, set-compression), as part of the mailbox reducer
 * (core.ts calls it for a `ControlApplied` event; the control listener has already
 * validated the command and put it in order). Mutates the state and adds effects, like
 * the rest of the reducer. Does not own: set-lr / set-schedule (the scheduler's).
 */
import type { Consistency } from "../../shared/config/job.ts"
import { makeOptimizer, setHyperparams, type OptimizerPatch } from "../../shared/optim/optimizers.ts"
import type { ControlApplied } from "../../shared/protocol/control.ts"
import { Result } from "effect"
import { withSwitch } from "../../shared/wire/compression.ts"
import type { PsEffect, PsState } from "./core.ts"

export const control = (s: PsState, ev: ControlApplied, out: PsEffect[]) => {
  const c = ev.command as Record<string, unknown>
  switch (ev.verb) {
    case "pause":
    case "resume":
      s.paused = ev.verb === "pause" || s.stopped
      break
    case "checkpoint":
      out.push({ _tag: "Checkpoint", why: `ctl checkpoint #${ev.seq}` })
      break
    case "stop":
      s.paused = true
      if (!s.done && !s.stopped) out.push({ _tag: "Checkpoint", why: `ctl stop #${ev.seq}` })
      s.stopped = true
      break
    case "set-optimizer": {
      // new hyperparameters, same slots (setHyperparams refuses a change of state layout)
      const next = setHyperparams(s.core.optimizer.config, c.patch as OptimizerPatch)
      if (Result.isFailure(next)) out.push({ _tag: "Log", level: "warn", message: `set-optimizer: ${next.failure.message}` })
      else {
        s.core.optimizer = makeOptimizer(next.success)
        out.push({ _tag: "Log", level: "info", message: `optimizer → ${JSON.stringify(next.success)}` })
      }
      break
    }
    case "set-compression": {
      // the controller chose the version; one this shard has already broadcast starts at the next one
      const from = Number(c.fromVersion)
      const at = from > s.core.version ? from : s.core.version + 1
      if (at !== from) out.push({ _tag: "Log", level: "warn", message: `set-compression ${c.codec} from version ${from} arrived at version ${s.core.version}: it starts at ${at} on this shard` })
      s.codecSwitches = withSwitch(s.codecSwitches, { fromVersion: at, codec: String(c.codec) })
      out.push({ _tag: "Log", level: "info", message: `gradient codec → ${c.codec} from version ${at}` })
      break
    }
    case "set-consistency": {
      const mode = c.mode as Consistency["mode"]
      s.core.consistency = mode === "bounded" ? { mode, staleness: Number(c.staleness ?? 0) } : { mode }
      s.barrier = new Set(s.members)
      out.push({ _tag: "Log", level: "info", message: `consistency → ${JSON.stringify(s.core.consistency)}` })
      break
    }
  }
}
